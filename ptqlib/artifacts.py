"""Stage artifacts: what a stage leaves in ``runs/<id>/`` and how the next stage loads it.

``artifact.json`` says what kind of model is there. Two types are the library's own:

- ``hf``     a float model (``model/``, transformers ``save_pretrained``);
- ``quant``  a model with ``QuantLinear`` layers in the GPTQ checkpoint layout (``model/``);

the others are registered by the method modules that write them (``ArtifactType`` entries of
``ptqlib.methods``: a bitsandbytes 4-bit model, a peft adapter or ptqlib's balanced / QA adapter on the
artifact in ``base``, a QuantLinear model with a separate 16-bit LoRA branch, a llama.cpp GGUF file), each
with its loader, so this module names none of them.

A stage's input is either such a directory or a model name (the root of the pipeline); the
artifact.json names it as ``input`` (a sibling run dir, relative, or the model name).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError

from ptqlib.errors import ArtifactError
from ptqlib.files import RECORD, damaged_weights, read_json

ARTIFACT = "artifact.json"


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def describe(ref: str | Path) -> dict:
    """The artifact.json of a run dir, or ``{"type": "name"}`` for a model name."""
    p = Path(ref)
    info = read_json(p / ARTIFACT) if p.is_dir() else None
    if info is None:
        if p.is_dir() and (p / "config.json").exists():
            return {"type": "hf", "path": "."}
        return {"type": "name", "name": str(ref)}
    return info


def base_of(ref: str | Path, info: dict) -> str:
    """The input an adapter artifact sits on: a sibling run dir (relative path) or a model name."""
    p = Path(ref) / info["base"]
    return str(p) if p.is_dir() else info["base"]


def is_quantized(ref: str | Path) -> bool:
    info = describe(ref)
    if info["type"] in ("name", "hf"):
        return False
    if info["type"] == "quant":
        return True
    q = _artifact_type(ref, info).quantized
    return is_quantized(base_of(ref, info)) if q == "base" else bool(q)


def own_gguf(ref: str | Path) -> Path | None:
    """The GGUF file a stage output *is* (a K-quant stage keeps llama.cpp's file), which runtime llama.cpp
    scores as it is; None for every other output (the evaluate stage exports those)."""
    info = describe(ref)
    if info["type"] in ("name", "hf", "quant"):
        return None
    hook = _artifact_type(ref, info).gguf
    return Path(hook(ref, info)) if hook else None


def _artifact_type(ref, info: dict):
    from ptqlib.methods import artifact_types

    types = artifact_types()
    if info["type"] not in types:
        raise ValueError(f"{ref}: unknown artifact type {info['type']!r}; valid: name, hf, quant, {', '.join(types)}")
    return types[info["type"]]


def load(ref: str | Path, device: str | None = None):
    """(model, tokenizer, info) for any stage output or model name, in eval mode."""
    device = device or default_device()
    info = describe(ref)
    check_weights(ref)
    try:
        model, tok = _load(ref, info, device)
    except (SafetensorError, EOFError) as e:  # a cut-short or overwritten weight file, of a run from before sizes were kept
        raise ArtifactError(f"{ref}: its weights cannot be read ({type(e).__name__}: {e}); re-run the stage that "
                            f"wrote it (ptqlib run --force, or delete the directory)") from e
    model.eval()
    return model, tok, info


def check_weights(ref: str | Path) -> None:
    """Refuse a run dir whose weight files differ from what its record lists (``files.damaged_weights``)."""
    p = Path(ref)
    rec = read_json(p / RECORD) if p.is_dir() else None
    damaged = damaged_weights(p, rec) if rec else []
    if damaged:
        raise ArtifactError(f"{ref} (stage {rec.get('label', p.name)}): {'; '.join(damaged)}; re-run the stage "
                            f"(ptqlib run re-runs it by itself) or delete the directory")


def _load(ref: str | Path, info: dict, device: str):
    from ptqlib.models import load_model, load_tokenizer

    if info["type"] == "name":
        model, tok = load_model(info["name"], device=device)
    elif info["type"] == "hf":
        model, tok = load_model(Path(ref) / info["path"], device=device)
    elif info["type"] == "quant":
        from ptqlib.quant.checkpoint import load_quantized

        path = Path(ref) / info["path"]
        model, tok = load_quantized(path).to(device), load_tokenizer(path)
    else:
        model, tok = _artifact_type(ref, info).load(ref, info, device)
    return model, tok


def float_model_dir(input_ref: str) -> Path:
    """The directory of the float model a quantize stage reads (a model name or an ``hf`` artifact)."""
    from ptqlib.models import resolve_model

    info = describe(input_ref)
    if info["type"] == "name":
        return Path(resolve_model(info["name"]))
    if info["type"] == "hf":
        return Path(input_ref) / info["path"]
    raise ValueError(f"{input_ref}: a {info['type']!r} artifact is not a float model; merge it before quantizing")


def input_of(ref: str | Path) -> str:
    """The input the stage at ``ref`` read: a run dir or a model name (artifact.json ``input``; for
    artifacts written before it was recorded, the stage record's ``input``, a sibling's stage id)."""
    info = describe(ref)
    if "input" in info:
        return base_of(ref, {"base": info["input"]})
    record = read_json(Path(ref) / "metrics.json") or {}
    rec = record.get("input") or record.get("model")  # no input id: the pipeline's model was the input
    if rec is None:
        raise ValueError(f"{ref}: its artifact.json does not say which input it was made from")
    sibling = Path(ref).resolve().parent / rec
    return str(sibling) if sibling.is_dir() else rec


def save(output_dir: str | Path, info: dict, input_ref: str | Path | None = None) -> None:
    """Write artifact.json (atomically); ``input_ref`` is recorded as ``input`` (see :func:`input_of`)."""
    from ptqlib.files import write_json_atomic

    if input_ref is not None:
        info = {**info, "input": base_ref(output_dir, input_ref)}
    write_json_atomic(Path(output_dir) / ARTIFACT, info)


def base_ref(output_dir: str | Path, input_ref: str | Path) -> str:
    """How an adapter artifact points at its base: a relative path for run dirs, else the name."""
    p = Path(input_ref)
    if p.is_dir():
        if p.resolve().parent == Path(output_dir).resolve():  # its own part (a re-quantized base in base/)
            return p.resolve().name
        return str(Path("..") / p.resolve().name) if p.resolve().parent == Path(output_dir).resolve().parent \
            else str(p.resolve())
    return str(input_ref)


def tensor_bytes(model: torch.nn.Module, float_bytes: int | None = None) -> int:
    """Bytes of every stored tensor (parameters, buffers, bnb quant states), tied weights once.

    ``float_bytes=2`` counts floating-point tensors at 16 bits: the size of a GPU deployment in
    fp16/bf16, independent of this CPU study computing in fp32. Integer / packed tensors (codes,
    bnb's uint8 storage) are counted as they are.
    """
    seen: set[int] = set()
    total = 0
    state = model.state_dict(keep_vars=True)  # alive to the end: it holds temporaries (bnb's packed states)
    for t in state.values():
        if not isinstance(t, torch.Tensor):
            continue
        key = t.data_ptr() if t.numel() else id(t)
        if key in seen:
            continue
        seen.add(key)
        per = float_bytes if (float_bytes and t.is_floating_point()) else t.element_size()
        total += t.numel() * per
    # bnb Params4bit keep absmax / code in a QuantState that state_dict() serialises as extra
    # tensors only for Linear4bit modules; count them from the modules to be exact.
    # as_dict (and state_dict) may build new tensors: keep them alive until the end, or a freed
    # one's address is reused by the next and wrongly counts as seen (NF4 sizes varied by 512 bytes)
    alive: list[torch.Tensor] = []
    for m in model.modules():
        qs = getattr(getattr(m, "weight", None), "quant_state", None)
        if qs is not None and hasattr(qs, "as_dict"):
            for v in qs.as_dict(packed=False).values():
                if isinstance(v, torch.Tensor) and v.data_ptr() not in seen:
                    alive.append(v)
                    seen.add(v.data_ptr())
                    total += v.numel() * (float_bytes if (float_bytes and v.is_floating_point()) else v.element_size())
    return total


def size_metrics(model: torch.nn.Module, ref: str | Path) -> dict[str, float]:
    """``size_mb_deploy``: every tensor ``model`` holds, floats at 16 bits (:func:`tensor_bytes`), or the GGUF
    file the artifact is (:func:`own_gguf`: a K-quant), or for an adapter on a K-quant that file plus the
    adapter's tensors at 16 bits (torch holds the file's weights de-quantized, which are not what deploys);
    ``size_mb_stored``: the weight files on disk of the artifact at ``ref``, base chain included."""
    own = own_gguf(ref)
    deploy = own.stat().st_size if own else tensor_bytes(model, float_bytes=2)
    info = describe(ref)
    base_file = own_gguf(base_of(ref, info)) if not own and "base" in info else None
    if base_file is not None:  # the base's tensors are in the model at 16 bits: count them as the file instead
        deploy += base_file.stat().st_size - 2 * gguf_elements(base_file)
    return {"size_mb_deploy": deploy / 2**20, "size_mb_stored": dir_bytes(ref) / 2**20}


def gguf_elements(path: str | Path) -> int:
    """Weights stored in a GGUF file (every tensor's element count; a tied embedding once)."""
    import gguf

    return sum(int(t.n_elements) for t in gguf.GGUFReader(str(path)).tensors)


def dir_bytes(ref: str | Path) -> int:
    """Bytes on disk of an artifact including its base chain (a model name counts its cache dir)."""
    from ptqlib.models import resolve_model

    info = describe(ref)
    if info["type"] == "name":
        p = resolve_model(info["name"])
        return sum(f.stat().st_size for f in Path(p).rglob("*.safetensors")) if isinstance(p, Path) else 0
    own = sum(f.stat().st_size for pattern in ("*.safetensors", "*.gguf") for f in Path(ref).rglob(pattern))
    if "base" in info:
        own += dir_bytes(base_of(ref, info))
    return own


def save_summary(output_dir: str | Path) -> dict:
    return json.loads((Path(output_dir) / ARTIFACT).read_text())

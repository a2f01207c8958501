"""Saving / loading quantized models in the GPTQ ecosystem checkpoint layout.

``save_quantized`` writes ``model.safetensors`` (the state dict: ``qweight``, ``qzeros``,
``scales``, ``g_idx``, ``bias`` per quantized linear, everything else in float) and
``config.json`` with a ``quantization_config``:

* integer zero points -> ``{"quant_method": "gptq", "checkpoint_format": "gptq", bits,
  group_size, desc_act, sym, ...}``: the AutoGPTQ / GPTQModel v1 format (``qzeros`` holds
  ``zero - 1``, see ``pack``), which GPTQModel, vLLM and transformers' GPTQ integration load on
  GPU. A ``quantize_config.json`` with the same content is written for older AutoGPTQ readers.
  A group whose zero point is 0 cannot be stored in v1 so that those readers read it back (they
  add the 1 without a modulo); ptqlib's grids never make one, and for codes that have one the
  file is written in the v2 layout instead (``"checkpoint_format": "gptq_v2"``: ``qzeros`` holds
  ``zero``), which GPTQModel reads and v1-only readers refuse.
* float zero points (any layer with ``float_zeros``: QA-LoRA / QA-BLoRA merges, L4Q with a
  float offset) -> ``{"quant_method": "ptqlib", "checkpoint_format": "ptqlib_fzeros", ...}``:
  same tensors except ``fzeros`` float32 ``(G, out)`` replaces ``qzeros``, and
  ``W = scales * (q - fzeros)``. The GPTQ format cannot hold it; only ``load_quantized``
  reads it as is. Runtimes whose format has a float per-group offset can take it after a
  conversion (``w = scale * q + m`` with ``m = -scale * fzeros``): GGUF ``Q4_1``
  (blocks of 32, fp16 ``d`` and ``m``) and torchao's tinygemm int4 layout (bf16 scale and
  zero per group). No converter is shipped here.

``load_quantized`` rebuilds the architecture from ``config.json`` with
``AutoModelForCausalLM.from_config``, swaps ``QuantLinear`` in where the file has a
``qweight``, and loads the state dict: a bit-exact round trip. Tied embeddings are stored
once (safetensors refuses shared tensors) and re-tied by the model.
"""
from __future__ import annotations

import json
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .layers import set_module
from .pack import count_v1_unsafe_zeros, pack_qzeros, pack_qzeros_v2, unpack_qzeros_v2
from .qlinear import QuantLinear
from .rtn import QUANT_INFO_ATTR

WEIGHTS_NAME = "model.safetensors"
QUANTIZER_TAG = "ptqlib:0.1.0"


def _quant_layers(model: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def _is_sym(layer: QuantLinear) -> bool:
    return not layer.float_zeros and bool((layer.zero_points() == 2 ** (layer.bits - 1)).all())


def _has_perm_g_idx(layer: QuantLinear) -> bool:
    g = layer.in_features // layer.n_groups
    trivial = torch.arange(layer.in_features, device=layer.g_idx.device) // g
    return not torch.equal(layer.g_idx.long(), trivial)


def quantization_config(model: nn.Module) -> dict[str, Any]:
    """The ``quantization_config`` dict for ``model`` (format fields derived from its layers)."""
    qlayers = _quant_layers(model)
    if not qlayers:
        raise ValueError("model has no QuantLinear layers")
    kinds = {(m.bits, m.group_size) for m in qlayers.values()}
    if len(kinds) != 1:
        raise ValueError(f"mixed bits/group_size across layers is not supported by the format: {sorted(kinds)}")
    (bits, group_size), = kinds
    info = dict(getattr(model, QUANT_INFO_ATTR, {}) or {})
    float_zeros = any(m.float_zeros for m in qlayers.values())
    desc_act = bool(info.get("desc_act", False)) or any(_has_perm_g_idx(m) for m in qlayers.values())
    qc: dict[str, Any] = {
        "quant_method": "ptqlib" if float_zeros else "gptq",
        "checkpoint_format": "ptqlib_fzeros" if float_zeros else "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": desc_act,
        # derived from the stored zeros, so it is true of the file whatever produced it
        "sym": all(_is_sym(m) for m in qlayers.values()),
        # static groups only mean something with act-order; without it the flag had no effect
        "static_groups": bool(info.get("static_groups", False)) and desc_act,
        "true_sequential": bool(info.get("true_sequential", True)),
        "damp_percent": float(info.get("damp", 0.01)),
        "lm_head": False,
        "pack_dtype": "int32",
        "meta": {"quantizer": [QUANTIZER_TAG], "method": info.get("method", "unknown")},
    }
    if float_zeros:
        qc["zero_dtype"] = "float32"
    return qc


def _dedup_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict with tensors that share storage (tied embeddings) kept once, first name wins."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    for k, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        out[k] = t.detach().contiguous().cpu()
    return out


def is_quantized_checkpoint(qcfg: dict | None) -> bool:
    """Whether a config.json ``quantization_config`` is one :func:`load_quantized` reads: the GPTQ checkpoint
    layout (integer zeros) or ptqlib's float-zero one (module docstring)."""
    return bool(qcfg) and qcfg.get("quant_method") in ("gptq", "ptqlib")


def save_quantized(model: nn.Module, out_dir: str | Path, tokenizer: Any = None) -> Path:
    """Write ``model`` (with ``QuantLinear`` layers) to ``out_dir``; returns the directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    qc = quantization_config(model)
    state = _dedup_state_dict(model)
    if any("lora_" in k for k in state):
        raise ValueError("model carries LoRA layers: save the adapter with peft and the base "
                         "(before get_peft_model, or after unload()) with save_quantized")
    if qc["quant_method"] == "gptq":
        layers = _quant_layers(model)
        bad = sum(count_v1_unsafe_zeros(m.qzeros, m.bits) for m in layers.values())
        if bad:  # v1 readers would misread these groups: write the v2 layout (module docstring)
            warnings.warn(f"{bad} groups have zero point 0, which v1 GPTQ readers (vLLM, AutoGPTQ) read as "
                          f"2^bits: writing checkpoint_format 'gptq_v2' (zeros without the -1 offset)",
                          stacklevel=2)
            qc["checkpoint_format"] = "gptq_v2"
            for name, m in layers.items():
                key = f"{name}.qzeros"
                if key in state:
                    state[key] = pack_qzeros_v2(m.zero_points().t(), m.bits).cpu()
    save_file(state, str(out / WEIGHTS_NAME), metadata={"format": "pt"})

    cfg = model.config.to_dict()
    cfg["quantization_config"] = qc
    emb = model.get_input_embeddings().weight
    cfg["dtype"] = str(emb.dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str))
    (out / "quantize_config.json").write_text(json.dumps(qc, indent=2, sort_keys=True))
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def _no_init():
    """Skip random init while rebuilding (every tensor is overwritten by the checkpoint)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return nullcontext()
    return no_init_weights()


def load_quantized(out_dir: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model written by ``save_quantized``; outputs and buffers are bit-identical."""
    from transformers import AutoConfig, AutoModelForCausalLM

    src = Path(out_dir)
    qc = json.loads((src / "config.json").read_text())["quantization_config"]
    fmt = qc.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", "gptq_v2", "ptqlib_fzeros"):
        raise ValueError(f"unsupported checkpoint_format {fmt!r} (expected 'gptq' v1, 'gptq_v2' or 'ptqlib_fzeros')")
    config = AutoConfig.from_pretrained(src)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # from_config must build a plain float model
    state = load_file(str(src / WEIGHTS_NAME))
    emb_key = next(k for k in state if k.endswith("embed_tokens.weight") or k.endswith("wte.weight"))
    dtype = state[emb_key].dtype
    with _no_init():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)

    bits, group_size = int(qc["bits"]), int(qc["group_size"])
    if fmt == "gptq_v2":  # QuantLinear holds the v1 layout (exact for every zero, pack module)
        for key in [k for k in state if k.endswith(".qzeros")]:
            state[key] = pack_qzeros(unpack_qzeros_v2(state[key], bits), bits)
    for key in [k for k in state if k.endswith(".qweight")]:
        prefix = key[: -len(".qweight")]
        lin = model.get_submodule(prefix)
        q = QuantLinear(lin.in_features, lin.out_features, bits, group_size,
                        bias=f"{prefix}.bias" in state, float_zeros=f"{prefix}.fzeros" in state,
                        dtype=state[f"{prefix}.scales"].dtype)
        set_module(model, prefix, q)
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"unexpected keys in checkpoint: {result.unexpected_keys[:5]}")
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    missing = [k for k in result.missing_keys if k not in tied]
    if missing:
        raise ValueError(f"keys missing from checkpoint: {missing[:5]}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    if (src / "generation_config.json").exists():
        # from_config derives a generation config from config.json, whose use_cache is often
        # False after training: generation would then re-run the whole prompt for every token
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(src)
    setattr(model, QUANT_INFO_ATTR, {
        "method": qc.get("meta", {}).get("method", qc["quant_method"]), "bits": bits,
        "group_size": group_size, "sym": qc.get("sym"), "desc_act": qc.get("desc_act"),
        "static_groups": qc.get("static_groups", False),
    })
    return model.to(device).eval()

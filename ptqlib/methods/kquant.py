"""llama.cpp's K-quants as a PTQ method: ``method: kquant`` quantizes the float model with llama.cpp's own
quantizer (``Q{bits}_K_{mix}``: Q4_K_M at ``bits: 4``, the default mix ``M``; Q3_K_M, Q5_K_M, Q2_K, Q6_K ...),
the formats most local models are shipped in (``ptqlib/deploy/kquants.py`` says how they are built).

The stage keeps the GGUF file itself (``model.gguf``, what a user deploys) beside the model's config and
tokenizer; loading it de-quantizes every tensor with the ``gguf`` package's reference de-quantizer into a
float model of the same architecture, so torch scores, fine-tunes (QLoRA on the frozen de-quantized
weights: its base is exactly the K-quant grid) and compares it with the 16-bit model, while
``runtime: llama.cpp`` scores the file as it is (``ArtifactType.gguf``). ``imatrix: true`` takes an importance matrix from the calibration windows (llama-imatrix's mean squared
inputs per column, ``deploy.kquants.importance``; calib_samples x calib_seq_len tokens drawn by the pipeline's
seed, so each seed is its own draw, as GPTQ's), without it none (docs/formats.md). The models the GGUF export
writes (Llama-style and Gemma 3 of llama.cpp's layer pattern); another is refused at load with the export's reason.
"""
from __future__ import annotations

import shutil
import tempfile
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

from ptqlib.errors import ConfigError
from ptqlib.methods import ArtifactType, Options, QuantizeMethod, StageSettings, register

MIXES = ("S", "M", "L")
# (bits, mix) -> llama.cpp type; 2 and 6 bits have one mix each that llama.cpp names without M
_TYPES = {(2, "S"): "Q2_K_S", (2, "M"): "Q2_K", (3, "S"): "Q3_K_S", (3, "M"): "Q3_K_M", (3, "L"): "Q3_K_L",
          (4, "S"): "Q4_K_S", (4, "M"): "Q4_K_M", (5, "S"): "Q5_K_S", (5, "M"): "Q5_K_M", (6, "M"): "Q6_K"}
BITS = (2, 3, 4, 5, 6)


@dataclass
class KQuantOptions(Options):
    mix: str = "M"  # kquant: llama.cpp's K-quant mix (S, M, L: how many tensors get more bits): bits 4, mix M -> Q4_K_M
    imatrix: bool = False  # kquant: weigh the rounding by the calibration windows' mean squared inputs (llama-imatrix)

    def __post_init__(self) -> None:
        if self.mix not in MIXES:
            raise ConfigError(f"mix: {self.mix!r}; valid: {', '.join(MIXES)}")
        if not isinstance(self.imatrix, bool):
            raise ConfigError(f"imatrix: {self.imatrix!r} must be true or false (true: an importance matrix from the "
                              "calibration windows, calib_samples x calib_seq_len tokens)")


def kquant_type(bits: int, mix: str) -> str:
    """``Q{bits}_K_{mix}`` as llama.cpp names it; a ConfigError for a pair llama.cpp does not have."""
    if bits == 6:
        return "Q6_K"  # one mix only
    if (bits, mix) not in _TYPES:
        valid = ", ".join(f"bits {b} mix {m} ({t})" for (b, m), t in _TYPES.items())
        raise ConfigError(f"bits {bits} with mix {mix!r} is no llama.cpp K-quant; valid: {valid}")
    return _TYPES[(bits, mix)]


def _check(p: dict) -> str | None:
    try:
        kquant_type(p["bits"], p["mix"])
    except ConfigError as e:
        return str(e)
    return None


def quantize(input_ref: str, p: StageSettings, calib=None, progress: bool = False):
    """The float model -> F16 GGUF (ptqlib's export) -> llama.cpp's K-quant file (with the importance matrix of
    the calibration windows where ``imatrix``) -> its weights de-quantized into the model; the file waits in a
    temp directory for :func:`save`."""
    from ptqlib import artifacts
    from ptqlib.deploy import export_gguf
    from ptqlib.deploy.kquants import importance, load_weights, quantize_file

    ktype = kquant_type(p.bits, p.mix)
    if p.imatrix and calib is None:
        raise ConfigError("kquant with imatrix: true needs calibration windows (ptqlib.stages.quantize."
                          "calibration_windows gives the stage's); none were passed")
    model, tok, _ = artifacts.load(input_ref)
    t0 = time.perf_counter()
    imatrix = importance(model, calib.to(next(model.parameters()).device), p.precision) if p.imatrix else None
    tmp = Path(tempfile.mkdtemp(prefix="ptqlib-kquant-"))
    try:
        export_gguf(model, tok, tmp / "f16.gguf", type="f16")
        quantize_file(tmp / "f16.gguf", tmp / "model.gguf", ktype, imatrix=imatrix)
        types = load_weights(model, tmp / "model.gguf")
        _mark(model)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    (tmp / "f16.gguf").unlink()
    model._ptqlib_gguf = tmp / "model.gguf"
    weakref.finalize(model, shutil.rmtree, tmp, True)  # gone with the model if save never runs (a failed stage)
    counts: dict[str, int] = {}
    for t in types.values():
        counts[t] = counts.get(t, 0) + 1
    return model, tok, {"method": "kquant", "type": ktype, "tensor_types": counts, "time_s": time.perf_counter() - t0,
                        "imatrix_tensors": len(imatrix or {})}


def save(model, tokenizer, p: StageSettings, output_dir) -> dict:
    out = Path(output_dir)
    (out / "model").mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(out / "model")
    model.generation_config.save_pretrained(out / "model")  # from_config at load would derive one from config.json
    tokenizer.save_pretrained(out / "model")
    src = model._ptqlib_gguf
    shutil.move(str(src), out / "model.gguf")
    shutil.rmtree(src.parent, ignore_errors=True)
    return {"type": "gguf", "path": "model", "gguf": "model.gguf", "method": "kquant",
            "kquant": kquant_type(p.bits, p.mix)}


def load(ref, info: dict, device: str):
    """A float model of the saved config with the GGUF file's weights, de-quantized (exactly), and the saved
    generation config: the one ``from_config`` derives from a trained ``config.json`` has ``use_cache: false``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from ptqlib.deploy.kquants import load_weights
    from ptqlib.models import load_tokenizer

    path = Path(ref) / info["path"]
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.float32)
    load_weights(model, Path(ref) / info["gguf"])
    _mark(model)
    if (path / "generation_config.json").exists():  # stages saved before 2026-12-06 have none
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model.to(device), load_tokenizer(path)


def _mark(model) -> None:
    """Its linear layers hold K-quant weights (what :func:`dense_weight` recognises): the float layers that
    the file filled; the output layer is the embedding's, tied."""
    from torch import nn

    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and name != "lm_head":
            mod._ptqlib_kquant = True


def dense_weight(module):
    """A K-quant layer's weight (already de-quantized, fp32); None for any other layer."""
    return module.weight.detach().float() if getattr(module, "_ptqlib_kquant", False) else None


register(
    QuantizeMethod("kquant", "llama.cpp's K-quants (Q4_K_M, Q3_K_M, ...: bits and mix) by llama.cpp's own quantizer",
                   BITS, "gguf", quantize, save, settings=("bits", "mix", "imatrix"), label_keys=("bits", "mix", "imatrix"),
                   calibration=lambda p: bool(p.get("imatrix")),
                   options=KQuantOptions, inert=lambda p: {"group_size"} | ({"mix"} if p.get("bits") == 6 else set()),
                   check=_check, dense_weight=dense_weight,
                   variants=", ".join(f"{t} (bits {b}" + (f", mix {m})" if b != 6 else ")") for (b, m), t in _TYPES.items())),
    ArtifactType("gguf", load, quantized=True, gguf=lambda ref, info: Path(ref) / info["gguf"]),
)

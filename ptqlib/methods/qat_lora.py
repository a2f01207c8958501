"""QAT-LoRA: the L4Q paper's baseline, a learnable quantizer on the frozen weight and a LoRA branch
beside it (``ptqlib/adapters/qat_lora.py``). The output is quantized, and keeps its 16-bit adapter."""
from __future__ import annotations

from pathlib import Path

from ptqlib.methods import ArtifactType, FinetuneMethod, StageSettings, register
from ptqlib.methods.l4q import GridOptions
from ptqlib.quant.grid import SUPPORTED_BITS


def prepare(model, p: StageSettings, input_ref: str):
    from ptqlib.adapters.qat_lora import apply_qat_lora

    return apply_qat_lora(model, bits=p.bits, group_size=p.group_size, rank=p.rank, alpha=p.alpha,
                          target_modules=list(p.target_modules), quantizer_kernel=p.quantizer_kernel)


def save(model, tokenizer, p: StageSettings, output_dir, input_ref: str) -> dict:
    from ptqlib.adapters.qat_lora import save_exported

    out = Path(output_dir)
    save_exported(model, out / "model", out / "adapter", tokenizer=tokenizer)
    return {"type": "qat_lora", "path": "model", "adapter": "adapter"}


def load(ref, info: dict, device: str):
    from ptqlib.adapters import qat_lora
    from ptqlib.models import load_model

    base, tok = load_model(Path(ref) / info["path"], device=device)
    return qat_lora.load_exported(base, Path(ref) / info["adapter"]), tok


register(
    FinetuneMethod("qat_lora", "learnable quantizer on the frozen weight, LoRA beside it (float -> low-bit + adapter)",
                   needs="float", gives="quantized", prepare=prepare, save=save,
                   settings=("bits", "group_size", "lr", "steps", "rank", "alpha"),
                   label_keys=("bits", "group_size"), bits=SUPPORTED_BITS, group="own", keeps_adapter=True,
                   options=GridOptions),
    ArtifactType("qat_lora", load, quantized=True),
)

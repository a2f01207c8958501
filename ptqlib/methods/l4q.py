"""L4Q: quantization-aware fine-tuning with LoRA merged into the weight before a learnable quantizer
(the maths and the memory-saving backward: ``ptqlib/adapters/l4q.py``). Float input; the output is a
fully quantized model (``QuantLinear``, the GPTQ layout) of the method's own bits and group."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ptqlib.methods import FinetuneMethod, register
from ptqlib.quant.grid import SUPPORTED_BITS

if TYPE_CHECKING:
    from ptqlib.study.params import FinetuneParams


def prepare(model, p: FinetuneParams, input_ref: str):
    from ptqlib.adapters.l4q import apply_l4q

    return apply_l4q(model, bits=p.bits, group_size=p.group_size, rank=p.rank, alpha=p.alpha,
                     target_modules=list(p.target_modules))


def save(model, tokenizer, p: FinetuneParams, output_dir, input_ref: str) -> dict:
    from ptqlib.adapters.l4q import export_l4q
    from ptqlib.quant.checkpoint import save_quantized

    export_l4q(model)
    save_quantized(model, Path(output_dir) / "model", tokenizer=tokenizer)
    return {"type": "quant", "path": "model", "exported_from": "l4q"}


register(FinetuneMethod("l4q", "LoRA inside a learnable quantizer (quantization-aware; float -> low-bit)",
                        needs="float", gives="quantized", prepare=prepare, save=save,
                        settings=("bits", "group_size", "lr", "steps", "rank", "alpha"),
                        label_keys=("bits", "group_size"), bits=SUPPORTED_BITS, group="own"))

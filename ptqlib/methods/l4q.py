"""L4Q: quantization-aware fine-tuning with LoRA merged into the weight before a learnable quantizer
(the maths and the memory-saving backward: ``ptqlib/adapters/l4q.py``). Float input; the output is a
fully quantized model (``QuantLinear``, the GPTQ layout) of the method's own bits and group."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ptqlib.adapters import QUANTIZER_KERNELS
from ptqlib.errors import ConfigError, check_choice
from ptqlib.methods import FinetuneMethod, Options, StageSettings, register
from ptqlib.quant.grid import SUPPORTED_BITS

DEFAULT_GROUP = 64  # the group when group_size is left at 0 (SmolLM2's 576-wide layers take 64, not 128)


@dataclass
class GridOptions(Options):
    """The grid of a method that trains into its own quantized weights (l4q, qat_lora)."""

    bits: int = 4  # l4q/qat_lora: weight bits
    group_size: int = 0  # l4q/qat_lora: quantization group (0: 64, -1: the whole row)
    quantizer_kernel: str = "auto"  # l4q/qat_lora: the quantizer's element-wise work compiled (auto: where a compiler works) or eager; the same numbers either way

    def __post_init__(self) -> None:
        check_choice("bits", self.bits, SUPPORTED_BITS)
        check_choice("quantizer_kernel", self.quantizer_kernel, QUANTIZER_KERNELS)
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < -1:
            raise ConfigError(f"group_size: {self.group_size!r} must be -1, 0 (the method's default) or a positive integer")
        if self.group_size == 0:
            self.group_size = DEFAULT_GROUP


def prepare(model, p: StageSettings, input_ref: str):
    from ptqlib.adapters.l4q import apply_l4q

    return apply_l4q(model, bits=p.bits, group_size=p.group_size, rank=p.rank, alpha=p.alpha,
                     target_modules=list(p.target_modules), quantizer_kernel=p.quantizer_kernel)


def save(model, tokenizer, p: StageSettings, output_dir, input_ref: str) -> dict:
    from ptqlib.adapters.l4q import export_l4q
    from ptqlib.quant.checkpoint import save_quantized

    export_l4q(model)
    save_quantized(model, Path(output_dir) / "model", tokenizer=tokenizer)
    return {"type": "quant", "path": "model", "exported_from": "l4q"}


register(FinetuneMethod("l4q", "LoRA inside a learnable quantizer (quantization-aware; float -> low-bit)",
                        needs="float", gives="quantized", prepare=prepare, save=save,
                        settings=("bits", "group_size", "lr", "steps", "rank", "alpha"),
                        label_keys=("bits", "group_size"), bits=SUPPORTED_BITS, group="own",
                        options=GridOptions))

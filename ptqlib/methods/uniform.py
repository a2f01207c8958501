"""RTN and GPTQ: integer codes on a uniform grid (scale and zero per group), as ``QuantLinear``.

The two differ only in how the codes are chosen (``ptqlib.quant.rtn`` rounds each weight to its
nearest grid point; ``ptqlib.quant.gptq`` updates the not-yet-quantized columns with the inverse
Hessian of the calibration inputs); both write the GPTQ checkpoint layout (``ptqlib.quant.checkpoint``).
"""
from __future__ import annotations

from dataclasses import dataclass

from ptqlib.errors import ConfigError, check_choice, check_positive
from ptqlib.methods import Options, QuantizeMethod, StageSettings, register
from ptqlib.quant.grid import GROUP_GRIDS, SUPPORTED_BITS, SYM_GRIDS


@dataclass
class RTNOptions(Options):
    sym: bool = False  # rtn/gptq/awq/autoround: symmetric grid (zero fixed at 2^(b-1))
    sym_grid: str = "full"  # rtn/gptq with sym: full: scale 2 max|w| / (2^b - 1), every code used (GPTQ reference); max: scale max|w| / (2^(b-1) - 1), +-max exact (ptqlib before)

    def __post_init__(self) -> None:
        check_choice("sym_grid", self.sym_grid, SYM_GRIDS)


@dataclass
class GPTQOptions(RTNOptions):
    group_grid: str = "lazy"  # gptq without act-order: a group's grid from the lazily updated weights (lazy, the reference's codes) or the block's error-updated copy (updated, ptqlib before)
    act_order: bool = False  # gptq: quantize columns in order of decreasing Hessian diagonal
    static_groups: bool = True  # gptq: with act_order, fix the group grids before permuting
    true_sequential: bool = True  # gptq: [qkv] -> [o] -> [up, gate] -> [down] inside each block
    damp: float = 0.01  # gptq: dampening, as a fraction of the mean Hessian diagonal
    block_size: int = 128  # gptq: columns per lazy batch update

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("group_grid", self.group_grid, GROUP_GRIDS)
        check_positive("block_size", self.block_size)
        if isinstance(self.damp, bool) or not isinstance(self.damp, (int, float)) or not 0 < self.damp < 1:
            raise ConfigError(f"damp: {self.damp!r} must be in (0, 1)")


def quantize_rtn(input_ref: str, p: StageSettings, calib=None, progress: bool = False):
    from ptqlib import artifacts
    from ptqlib.quant import rtn_quantize_model

    model, tok, _ = artifacts.load(input_ref)  # on CUDA where there is one
    stats = rtn_quantize_model(model, bits=p.bits, group_size=p.group_size, sym=p.sym, progress=progress,
                               sym_grid=p.sym_grid)
    return model, tok, stats


def quantize_gptq(input_ref: str, p: StageSettings, calib=None, progress: bool = False):
    from ptqlib import artifacts
    from ptqlib.quant.gptq_model import gptq_quantize_model

    if calib is None:
        raise ValueError("gptq needs calibration windows (ptqlib.stages.quantize.calibration_windows)")
    model, tok, _ = artifacts.load(input_ref)
    stats = gptq_quantize_model(
        model, [c.unsqueeze(0) for c in calib], bits=p.bits, group_size=p.group_size, sym=p.sym,
        act_order=p.act_order, static_groups=p.static_groups, true_sequential=p.true_sequential,
        damp=p.damp, block_size=p.block_size, progress=progress, group_grid=p.group_grid,
        sym_grid=p.sym_grid, precision=p.precision)
    return model, tok, stats


def save_uniform(model, tokenizer, p: StageSettings, output_dir) -> dict:
    from pathlib import Path

    from ptqlib.quant import save_quantized

    save_quantized(model, Path(output_dir) / "model", tokenizer=tokenizer)
    return {"type": "quant", "path": "model", "method": p.method}


def inert_rtn(params: dict) -> set[str]:
    """``sym_grid`` shapes only a symmetric grid."""
    return set() if params.get("sym") else {"sym_grid"}


def inert_gptq(params: dict) -> set[str]:
    """As RTN's, and ``group_grid`` acts only on groups chosen as the columns go (not per row, not static)."""
    dynamic = params.get("group_size") != -1 and not (params.get("act_order") and params.get("static_groups"))
    return inert_rtn(params) | (set() if dynamic else {"group_grid"})


def dense_weight(module):
    """A ``QuantLinear``'s weight from its codes (fp32); None for any other layer."""
    import torch

    from ptqlib.quant import QuantLinear

    return module.dequantize_weight(torch.float32) if isinstance(module, QuantLinear) else None


register(
    QuantizeMethod("rtn", "round to nearest on a uniform grid per group", SUPPORTED_BITS, "uniform", quantize_rtn,
                   save_uniform, settings=("bits", "group_size", "sym"), label_keys=("bits", "group_size"),
                   options=RTNOptions, inert=inert_rtn, dense_weight=dense_weight),
    QuantizeMethod("gptq", "GPTQ: second-order error compensation from calibration inputs", SUPPORTED_BITS,
                   "uniform", quantize_gptq, save_uniform,
                   settings=("bits", "group_size", "sym", "act_order", "calib_samples", "calib_seq_len"),
                   label_keys=("bits", "group_size"), calibration=True, options=GPTQOptions, inert=inert_gptq,
                   dense_weight=dense_weight),
)

"""RTN and GPTQ: integer codes on a uniform grid (scale and zero per group), as ``QuantLinear``.

The two differ only in how the codes are chosen (``ptqlib.quant.rtn`` rounds each weight to its
nearest grid point; ``ptqlib.quant.gptq`` updates the not-yet-quantized columns with the inverse
Hessian of the calibration inputs); both write the GPTQ checkpoint layout (``ptqlib.quant.checkpoint``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ptqlib.methods import QuantizeMethod, register
from ptqlib.quant.grid import SUPPORTED_BITS

if TYPE_CHECKING:
    from ptqlib.study.params import QuantizeParams


def quantize_rtn(input_ref: str, p: QuantizeParams, calib=None, progress: bool = False):
    from ptqlib import artifacts
    from ptqlib.quant import rtn_quantize_model

    model, tok, _ = artifacts.load(input_ref)  # on CUDA where there is one
    stats = rtn_quantize_model(model, bits=p.bits, group_size=p.group_size, sym=p.sym, progress=progress,
                               sym_grid=p.sym_grid)
    return model, tok, stats


def quantize_gptq(input_ref: str, p: QuantizeParams, calib=None, progress: bool = False):
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


def save_uniform(model, tokenizer, p: QuantizeParams, output_dir) -> dict:
    from pathlib import Path

    from ptqlib.quant import save_quantized

    save_quantized(model, Path(output_dir) / "model", tokenizer=tokenizer)
    return {"type": "quant", "path": "model", "method": p.method}


register(
    QuantizeMethod("rtn", "round to nearest on a uniform grid per group", SUPPORTED_BITS, "uniform", quantize_rtn,
                   save_uniform, settings=("bits", "group_size", "sym"), label_keys=("bits", "group_size")),
    QuantizeMethod("gptq", "GPTQ: second-order error compensation from calibration inputs", SUPPORTED_BITS,
                   "uniform", quantize_gptq, save_uniform,
                   settings=("bits", "group_size", "sym", "act_order", "calib_samples", "calib_seq_len"),
                   label_keys=("bits", "group_size"), calibration=True),
)

"""Uniform (RTN) quantization grid shared by RTN, GPTQ, L4Q export and the QA-(B)LoRA merges.

Notation (docs/INTERFACES.md): ``W: (out, in)``, groups of ``g`` consecutive input columns
(``g = -1``: one group per row), ``G = in // g`` groups, ``b`` bits, ``maxq = 2^b - 1``.
A code ``q`` in ``[0, maxq]`` stands for ``w_hat = scale * (q - zero)``.

Grid rules (docs/methods.md), those of the GPTQ reference quantizer (IST-DASLab/gptq ``quant.py``)
except where a group has no negative weight (below):

* asymmetric: ``scale = (max - min) / maxq``, ``zero = round(-min / scale)``, the range widened to
  contain 0 (``min <= 0 <= max``) so ``zero`` is a storable code and 0 is exactly representable.
  Zero point >= 1: where the rule gives ``zero = 0`` (a group that is non-negative up to half a
  step) we use ``zero = 1``, ``scale = max / (maxq - 1)`` instead. The GPTQ v1 checkpoint layout
  stores ``zero - 1`` and its readers (AutoGPTQ, vLLM, GPTQModel) add the 1 back without a modulo,
  so a zero of 0 would be read as ``2^b`` there (issue 14); SmolLM2-135M at g64 has no such group.
* symmetric, ``sym_grid="full"`` (default, the reference's): ``zero = 2^(b-1)``,
  ``scale = 2 max|w| / (2^b - 1)``: all ``2^b`` codes are used, ``-max|w|`` lies inside the grid
  and ``+max|w|`` is rounded to ``(2^(b-1) - 1) scale``. For a group with no negative weight the
  reference leaves ``min = 0`` and so clips the top half of the range; we keep ``2 max|w|``.
* symmetric, ``sym_grid="max"`` (ptqlib's rule before): ``scale = max|w| / (2^(b-1) - 1)``:
  ``+-max|w|`` are exact, code 0 stays unused (+9% output error at 4 bits g64, issue 14).

All-zero rows/groups get the grid of ``[-1, 1]`` (as the GPTQ reference does), so the scale
is never 0 and the zero point sits mid-range; their codes dequantize back to exactly 0.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .grid import SYM_GRIDS, check_bits, n_groups


def find_params(w: Tensor, bits: int, sym: bool, sym_grid: str = "full") -> tuple[Tensor, Tensor]:
    """Per-row grid of ``w: (out, k)`` -> ``(scale (out, 1), zero (out, 1))``, both float32.

    ``zero`` holds integers (as floats) in ``[1, 2^b - 1]`` (asymmetric) or ``2^(b-1)``
    (symmetric). Computed in float32 whatever ``w``'s dtype, so fp16/bf16 weights do not lose
    precision in ``max - min``. ``sym_grid``: ``"full"`` or ``"max"`` (module docstring).
    """
    check_bits(bits)
    if sym_grid not in SYM_GRIDS:
        raise ValueError(f"sym_grid must be one of {SYM_GRIDS}, got {sym_grid!r}")
    w = w.float()
    maxq = 2**bits - 1
    if sym:
        amax = w.abs().amax(dim=1, keepdim=True)  # (out, 1)
        amax = torch.where(amax == 0, torch.ones_like(amax), amax)  # all-zero row -> [-1, 1]
        scale = 2 * amax / maxq if sym_grid == "full" else amax / (2 ** (bits - 1) - 1)
        zero = torch.full_like(scale, 2 ** (bits - 1))
        return scale, zero
    # widen to contain 0: zero must be a storable code in [0, maxq]
    xmin = w.amin(dim=1, keepdim=True).clamp(max=0)  # (out, 1)
    xmax = w.amax(dim=1, keepdim=True).clamp(min=0)
    dead = (xmin == 0) & (xmax == 0)
    xmin = torch.where(dead, -torch.ones_like(xmin), xmin)
    xmax = torch.where(dead, torch.ones_like(xmax), xmax)
    scale = (xmax - xmin) / maxq
    zero = torch.round(-xmin / scale).clamp(0, maxq)
    # zero >= 1 (v1 layout): the grid [-scale, (maxq - 1) scale] still holds [min, max], since
    # min > -scale_old / 2 > -scale there
    low = zero == 0
    scale = torch.where(low, xmax / (maxq - 1), scale)
    zero = torch.where(low, torch.ones_like(zero), zero)
    return scale, zero


def quantize(w: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """``q = clamp(round(w / scale) + zero, 0, 2^b - 1)`` as long; scale/zero broadcast against w."""
    q = torch.round(w.float() / scale.float()) + zero.float()
    return q.clamp_(0, 2**bits - 1).long()


def dequantize(codes: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """``w_hat = scale * (q - zero)`` in the promoted float dtype of scale/zero."""
    return scale * (codes.to(scale.dtype) - zero)


def rtn_quantize(w: Tensor, bits: int, group_size: int, sym: bool,
                 sym_grid: str = "full") -> tuple[Tensor, Tensor, Tensor]:
    """Round-to-nearest of ``W: (out, in)`` with one grid per (row, group).

    Returns ``codes (out, in) long``, ``scales (out, G) float32``, ``zeros (out, G) float32``.
    """
    out_f, in_f = w.shape
    G = n_groups(in_f, group_size)
    g = in_f // G
    wg = w.float().reshape(out_f * G, g)  # one row per (row, group)
    scale, zero = find_params(wg, bits, sym, sym_grid)  # (out*G, 1)
    codes = quantize(wg, scale, zero, bits).reshape(out_f, in_f)
    return codes, scale.reshape(out_f, G), zero.reshape(out_f, G)

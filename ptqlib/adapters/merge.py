"""The QA-LoRA / QA-BLoRA merge into a low-bit model (:func:`merge_into_quantlinear`).

An adapter that pools its input over whole quantization groups adds ``dW`` that is constant on each
(row, group) cell of the weight; that constant ``D[o, c]`` folds into the cell's zero point,
``zero' = zero - D / scale``, so codes, scales and g_idx stay and the merged model is low-bit with
float zero points, exactly (QA-LoRA, Xu et al. 2023; QA-BLoRA, Shen et al. 2025).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .bases import _base_group_size, is_quantlinear


def _group_to_block(g_idx: Tensor, pool: int, n_groups: int, name: str) -> Tensor:
    """For each quantization group, the index of the pooling block that holds all its columns.

    ``dW`` is constant over a (row, group) cell only if every column of the group falls in one
    pooling block of ``p`` consecutive inputs; with act-order (permuted ``g_idx``) that fails.
    Returns (G,) long; groups with no column map to block 0 (their zero is never used).
    """
    g_idx = g_idx.long()
    blk = torch.arange(g_idx.numel(), device=g_idx.device) // pool  # (in,)
    lo = torch.full((n_groups,), torch.iinfo(torch.long).max, device=g_idx.device).scatter_reduce(0, g_idx, blk, "amin")
    hi = torch.full((n_groups,), -1, device=g_idx.device).scatter_reduce(0, g_idx, blk, "amax")
    used = hi >= 0
    bad = used & (lo != hi)
    if bad.any():
        raise ValueError(
            f"layer {name!r}: quantization group {int(bad.nonzero()[0])} spans several pooling blocks of {pool} "
            "inputs (act-order g_idx, or pool not a multiple of the group size), so dW is not constant per "
            "(row, group) and cannot be folded into the zero points; quantize with static groups or "
            "without act-order, and use pool = group size"
        )
    return torch.where(used, lo, torch.zeros_like(lo))


@torch.no_grad()
def merge_into_quantlinear(base: nn.Module, adapter: nn.Module, name: str = "") -> nn.Module:
    """Fold a pooled adapter (a ``balanced.BalancedLoRA``) into a copy of ``base`` (QuantLinear):
    ``zero' = zero - D / scale``.

    ``D (out, G)``: ``D[o, c] = (s/p) (B A)[o // k, block(c)]``, the constant value of dW on the
    (row ``o``, group ``c``) cell, folded by ``QuantLinear.fold_group_offset``. Codes, scales,
    g_idx and bias are unchanged; the zero points become float. Raises if the base is not a
    QuantLinear, if ``p`` is not a multiple of the group size, or if a group straddles pooling
    blocks (act-order).
    """
    if not is_quantlinear(base):
        raise ValueError(
            f"layer {name!r}: the zero-point merge needs a uniform QuantLinear base, got {type(base).__name__}"
            " (NF4/FP4 blocks have no zero point to absorb dW)"
        )
    g = _base_group_size(base)
    p = adapter.pool
    if p % g != 0:
        raise ValueError(
            f"layer {name!r}: pool factor {p} is not a multiple of the quantization group size {g}; the merge "
            f"is exact only when dW is constant per (row, group): use pool = group size ({g})"
        )
    g_idx = getattr(base, "g_idx", None)
    if g_idx is None:
        g_idx = torch.arange(base.in_features) // g
    device = base.scales.device
    block = _group_to_block(g_idx.to(device), p, base.n_groups, name)  # (G,)
    d = adapter.reduced_delta().float()  # (out/k, in/p)
    if adapter.repeat > 1:
        d = d.repeat_interleave(adapter.repeat, dim=0)  # (out, in/p)
    return base.fold_group_offset(d.to(device)[:, block], name)  # (out, G): dW on each (row, group) cell

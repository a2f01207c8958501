"""The rules of a quantization grid, stated once: bit widths, groups, signed ranges.

Torch-free, so validating a study file (``ptqlib.study.schema``) does not import torch. Used by the
uniform quantizers (RTN, GPTQ), ``QuantLinear``, L4Q / QAT-LoRA and the QA-(B)LoRA merges.

* bits ``b`` in ``SUPPORTED_BITS``: what the packed int32 checkpoint layout holds (``pack``).
* groups: ``g`` consecutive input columns share a scale / zero; ``g = -1`` means one group per
  row. ``g`` must divide ``in_features``; ``G = in / g`` groups.
* signed range (L4Q's integer codes): ``[Q_N, Q_P] = [-2^(b-1), 2^(b-1) - 1]``.
"""
from __future__ import annotations

SUPPORTED_BITS = (2, 3, 4, 8)
SYM_GRIDS = ("full", "max")  # symmetric scale: 2 max|w| / (2^b - 1) (the GPTQ reference) | max|w| / (2^(b-1) - 1)
GROUP_GRIDS = ("lazy", "updated")  # where GPTQ takes a group's grid from (ptqlib.quant.gptq)


def check_bits(bits: int) -> None:
    """Reject bit widths the packed checkpoint layout cannot hold."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")


def n_groups(in_features: int, group_size: int) -> int:
    """``G = in // g``; ``g = -1`` means one group per row. ``g`` must divide ``in``."""
    if group_size == -1:
        return 1
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0 \
            or in_features % group_size != 0:
        raise ValueError(
            f"group_size must be -1 or a positive divisor of in_features={in_features}, got {group_size}"
        )
    return in_features // group_size


def effective_group_size(in_features: int, group_size: int) -> int:
    """The number of columns in one group (``in`` for ``g = -1``), validated like ``n_groups``."""
    return in_features // n_groups(in_features, group_size)


def signed_range(bits: int) -> tuple[int, int]:
    """``(Q_N, Q_P) = (-2^(b-1), 2^(b-1) - 1)``: the signed integer codes of ``b`` bits."""
    check_bits(bits)
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


POOL_NORMS: tuple[str, ...] = ("mean", "sum")  # how a balanced adapter reduces a pooled block of inputs (adapters/balanced.py)

"""The frozen bases an adapter sits on: ``QuantLinear`` (uniform codes), bitsandbytes ``Linear4bit``
(NF4 / FP4; resolved lazily: its import costs seconds and prints warnings) or ``nn.Linear``."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ptqlib.quant.qlinear import QuantLinear


def _bnb_linear4bit_cls() -> type | None:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return None
    return bnb.nn.Linear4bit


def is_quantlinear(m: nn.Module) -> bool:
    return isinstance(m, QuantLinear)


def is_bnb_4bit(m: nn.Module) -> bool:
    # Check the module name first: importing bitsandbytes costs seconds and prints warnings.
    if "bitsandbytes" not in type(m).__module__:
        return False
    cls = _bnb_linear4bit_cls()
    return cls is not None and isinstance(m, cls)


def is_supported_base(m: nn.Module) -> bool:
    """QuantLinear, bitsandbytes Linear4bit (an nn.Linear subclass) or nn.Linear."""
    return is_quantlinear(m) or isinstance(m, nn.Linear)


def _base_device(m: nn.Module) -> torch.device:
    for t in list(m.parameters()) + list(m.buffers()):
        return t.device
    return torch.device("cpu")


def _base_group_size(base: nn.Module) -> int | None:
    """Effective quantization group size of a QuantLinear base (``-1`` -> ``in``), else None."""
    if not is_quantlinear(base):
        return None
    from ptqlib.quant.grid import effective_group_size

    return effective_group_size(base.in_features, int(base.group_size))


def dequantized_weight(base: nn.Module) -> Tensor:
    """The base's effective weight (out, in) in float: QuantLinear, Linear4bit or nn.Linear."""
    if is_quantlinear(base):
        return base.dequantize_weight()
    if is_bnb_4bit(base):
        import bitsandbytes.functional as bf

        return bf.dequantize_4bit(base.weight.data, base.weight.quant_state)
    return base.weight

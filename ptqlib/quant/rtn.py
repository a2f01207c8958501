"""Round-to-nearest (RTN) weight quantization of a whole model, in place."""
from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .grid import check_bits, n_groups
from .layers import find_linear_layers, set_module
from .qlinear import QuantLinear
from .uniform import rtn_quantize

QUANT_INFO_ATTR = "ptqlib_quant_info"  # model attribute the checkpoint writer reads (method settings)


def quantlinear_from_linear(
    linear: nn.Linear, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
    bits: int, group_size: int, g_idx: torch.Tensor | None = None,
) -> QuantLinear:
    """A ``QuantLinear`` with ``linear``'s dtype/device/bias from codes ``(out, in)``, scales/zeros ``(out, G)``."""
    w = linear.weight
    bias = linear.bias.detach() if linear.bias is not None else None
    return QuantLinear.from_codes(
        codes.to(w.device), scales.to(device=w.device, dtype=w.dtype), zeros.to(w.device),
        g_idx=g_idx, bias=bias, bits=bits, group_size=group_size,
    )


@torch.no_grad()
def rtn_quantize_model(
    model: nn.Module, bits: int = 4, group_size: int = 64, sym: bool = False, progress: bool = False,
    sym_grid: str = "full",
) -> dict[str, Any]:
    """Replace every decoder ``nn.Linear`` by an RTN-quantized ``QuantLinear``, in place.

    Returns stats: settings, ``time_s``, ``n_layers``, and per layer the relative weight error
    ``||W - W_hat||^2 / ||W||^2`` (``layers[name]["rel_weight_err"]``).
    """
    check_bits(bits)
    linears = find_linear_layers(model)
    for name, lin in linears.items():
        n_groups(lin.in_features, group_size)  # validate before touching the model
    t0 = time.perf_counter()
    layers: dict[str, dict[str, float]] = {}
    for name, lin in tqdm(linears.items(), desc="RTN", disable=not progress):
        w = lin.weight.detach()
        codes, scales, zeros = rtn_quantize(w, bits, group_size, sym, sym_grid)
        q = quantlinear_from_linear(lin, codes, scales, zeros, bits, group_size)
        err = (w.float() - q.dequantize_weight(torch.float32)).pow(2).sum() / w.float().pow(2).sum().clamp_min(1e-30)
        layers[name] = {"rel_weight_err": float(err)}
        set_module(model, name, q)
    info = {"method": "rtn", "bits": bits, "group_size": group_size, "sym": sym, "sym_grid": sym_grid,
            "desc_act": False, "static_groups": False}
    setattr(model, QUANT_INFO_ATTR, info)
    return {**info, "time_s": time.perf_counter() - t0, "n_layers": len(layers), "layers": layers}

"""GPTQ over a whole decoder model: calibration inputs captured at layer 0, then layer by layer (true
sequential inside a layer), each linear quantized by ``gptq.GPTQ`` from the Hessian of its inputs, the
next layer fed the quantized layer's outputs (Frantar et al., 2023, Section 4 "Full algorithm").
Written here because auto-gptq is archived and GPTQModel needs CUDA."""
from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .gptq import GPTQ, TRUE_SEQUENTIAL_GROUPS, _relative_output_errors
from .grid import GROUP_GRIDS, check_bits, n_groups
from .layers import find_linear_layers, get_decoder_layers, set_module
from .rtn import QUANT_INFO_ATTR, quantlinear_from_linear
from .uniform import rtn_quantize


class _StopForward(Exception):
    """Raised by the capture hook once decoder layer 0 has its inputs: the rest is not needed."""


def _layer_groups(names: list[str], true_sequential: bool) -> list[list[str]]:
    """Names of the layer's linears in quantization order (unknown names go last, together)."""
    if not true_sequential:
        return [names]
    groups = [[n for n in grp if n in names] for grp in TRUE_SEQUENTIAL_GROUPS]
    known = {n for grp in groups for n in grp}
    rest = [n for n in names if n not in known]
    return [grp for grp in groups + [rest] if grp]


class _DequantizedLinear(nn.Module):
    """Stand-in for a just quantized linear while its decoder layer is still being calibrated."""

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.weight, self.bias = weight, bias  # plain tensors: nothing trainable, nothing registered

    def forward(self, x: Tensor) -> Tensor:
        return torch.nn.functional.linear(x, self.weight, self.bias)


def _run_layer(layer: nn.Module, hidden: Tensor, kwargs: dict[str, Any]) -> Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def _capture_layer0_inputs(model: nn.Module, layers: nn.ModuleList, calib: list[Tensor], device: torch.device):
    """Per calibration sample: (hidden_states entering layer 0, the layer's forward kwargs)."""
    captured: list[tuple[Tensor, dict[str, Any]]] = []

    def pre_hook(mod, args, kwargs):
        kw = dict(kwargs)
        hidden = args[0] if args else kw.pop("hidden_states")
        captured.append((hidden.detach(), kw))  # position_embeddings, attention_mask, ...
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        for ids in calib:
            ids = ids.unsqueeze(0) if ids.dim() == 1 else ids  # (L,) -> (1, L)
            try:
                model(ids.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


@torch.no_grad()
def gptq_quantize_model(
    model: nn.Module,
    calib: list[Tensor],
    bits: int = 4,
    group_size: int = 64,
    sym: bool = False,
    act_order: bool = False,
    static_groups: bool = True,
    true_sequential: bool = True,
    damp: float = 0.01,
    block_size: int = 128,
    progress: bool = True,
    diagnostics: bool = True,
    group_grid: str = "lazy",
    sym_grid: str = "full",
    precision: str = "fp32",
) -> dict[str, Any]:
    """GPTQ every decoder ``nn.Linear`` of ``model`` in place (they become ``QuantLinear``).

    ``calib``: token id tensors ``(1, L)``. Sequential: decoder layer ``l`` is calibrated on the
    outputs of the already quantized layers ``< l``; inside a layer, ``true_sequential`` quantizes
    [q,k,v] -> [o] -> [up,gate] -> [down], re-running the layer between groups. Runs on the
    model's device. Returns stats: settings, ``time_s`` and per linear (full name)
    ``gptq_rel_err`` / ``rtn_rel_err`` (relative output error on the calibration inputs),
    ``time_s``, ``damp``, ``damp_retries``, ``fallback``, ``dead_inputs``, ``n_samples``.

    ``diagnostics=False`` skips the per-linear RTN comparison and output errors (their keys are
    then absent / ``None``); with them on, ``diagnostics_s`` is the time they took, so
    ``time_s - diagnostics_s`` is the algorithm's own wall time (what a benchmark compares).
    ``group_grid`` / ``sym_grid``: the grid rules (module docstring, ``uniform``).
    ``precision``: ``bf16`` runs the calibration forwards (the layer inputs that fill H) under bf16
    autocast, as the reference runs them in fp16; H, its Cholesky and the column updates stay fp32.
    """
    from ptqlib.precision import autocast

    check_bits(bits)
    if group_grid not in GROUP_GRIDS:
        raise ValueError(f"group_grid must be one of {GROUP_GRIDS}, got {group_grid!r}")
    for lin in find_linear_layers(model).values():
        n_groups(lin.in_features, group_size)  # fail before spending any time
    t_start = time.perf_counter()
    device = next(model.parameters()).device
    stack_name, layers = get_decoder_layers(model)
    was_training = model.training
    model.eval()

    def forwards():  # the calibration forwards' precision; never around the GPTQ update itself
        return autocast(precision, device.type)

    with forwards():
        inputs = _capture_layer0_inputs(model, layers, calib, device)
    hidden = [h for h, _ in inputs]
    kwargs = [kw for _, kw in inputs]
    stats_layers: dict[str, dict[str, Any]] = {}
    diag_s = 0.0
    settings = dict(bits=bits, group_size=group_size, sym=sym, act_order=act_order,
                    static_groups=static_groups, damp=damp, block_size=block_size,
                    group_grid=group_grid, sym_grid=sym_grid)

    bar = tqdm(range(len(layers)), desc="GPTQ", disable=not progress)
    for li in bar:
        layer = layers[li]
        linears = find_linear_layers(layer)
        done: dict[str, nn.Module] = {}  # QuantLinears, swapped in once the layer is calibrated
        for group in _layer_groups(list(linears), true_sequential):
            gptqs = {name: GPTQ(linears[name]) for name in group}
            handles = [gq.hook() for gq in gptqs.values()]
            with forwards():
                for h, kw in zip(hidden, kwargs):  # fills H with inputs seen after earlier groups
                    _run_layer(layer, h, kw)
            for hd in handles:
                hd.remove()
            for name, gq in gptqs.items():
                t0 = time.perf_counter()
                lin = linears[name]
                res = gq.quantize(bits, group_size, sym, act_order, static_groups, damp, block_size,
                                  group_grid=group_grid, sym_grid=sym_grid)
                q = quantlinear_from_linear(lin, res.codes, res.scales, res.zeros, bits, group_size, res.g_idx)
                W_hat = q.dequantize_weight(torch.float32)
                t_quant = time.perf_counter() - t0
                stats = {"time_s": t_quant, **res.info}
                if diagnostics:
                    t_diag = time.perf_counter()
                    W = lin.weight.detach().float()
                    r_codes, r_scales, r_zeros = rtn_quantize(W, bits, group_size, sym, sym_grid)
                    # RTN's W_hat as a QuantLinear of this dtype would hold it, without packing / unpacking
                    r_gi = torch.arange(W.shape[1], device=W.device) // (W.shape[1] // r_scales.shape[1])
                    r_scales = r_scales.to(lin.weight.dtype).float()
                    W_rtn = (r_codes.float() - r_zeros[:, r_gi]) * r_scales[:, r_gi]
                    gptq_err, rtn_err = _relative_output_errors(W, (W_hat, W_rtn), gq.H)
                    stats.update(gptq_rel_err=gptq_err, rtn_rel_err=rtn_err)
                    diag_s += time.perf_counter() - t_diag
                stats_layers[f"{stack_name}.{li}.{name}"] = stats
                # until the layer is done, its remaining calibration forwards use q's de-quantized
                # weight (the values QuantLinear.forward computes) in a plain F.linear: no unpacking
                # or per-layer dequant cache while calibrating, whatever QuantLinear.cache_dequantized
                bias = None if lin.bias is None else lin.bias.detach()
                set_module(layer, name, _DequantizedLinear(W_hat.to(lin.weight.dtype), bias))
                done[name] = q
                gq.free()
        # the next layer is calibrated on what the *quantized* layer produces
        with forwards():
            hidden = [_run_layer(layer, h, kw) for h, kw in zip(hidden, kwargs)]
        for name, q in done.items():
            set_module(layer, name, q)
        if diagnostics:
            errs = [v["gptq_rel_err"] for k, v in stats_layers.items() if k.startswith(f"{stack_name}.{li}.")]
            bar.set_postfix(err=f"{sum(errs) / max(1, len(errs)):.2e}")

    model.train(was_training)
    info = {"method": "gptq", **settings, "desc_act": act_order, "true_sequential": true_sequential}
    setattr(model, QUANT_INFO_ATTR, info)
    n = max(1, len(stats_layers))

    def mean(key: str) -> float | None:
        return sum(v[key] for v in stats_layers.values()) / n if diagnostics else None

    return {
        **info,
        "n_samples": len(calib),
        "time_s": time.perf_counter() - t_start,
        "diagnostics_s": diag_s,
        "n_layers": len(stats_layers),
        "mean_gptq_rel_err": mean("gptq_rel_err"),
        "mean_rtn_rel_err": mean("rtn_rel_err"),
        "total_damp_retries": sum(v["damp_retries"] for v in stats_layers.values()),
        "n_fallback": sum(v["fallback"] is not None for v in stats_layers.values()),
        "layers": stats_layers,
    }

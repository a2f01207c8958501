"""GPTQ (Frantar et al., ICLR 2023): second-order weight quantization, layer by layer.

For one linear layer ``W: (out, in)`` with calibration inputs ``X`` (N tokens), GPTQ minimises
``||X W^T - X W_hat^T||^2`` column by column: quantize column ``i``, then spread its error over
the not yet quantized columns with the inverse Hessian ``H^-1``, ``H = (2/N) sum x x^T``
(docs/methods.md). ``GPTQ`` below is that algorithm for one layer; ``gptq_quantize_model``
runs it sequentially over the decoder layers of a Hugging Face causal LM.

Without act-order (or with act-order and dynamic groups) a group's grid is computed when its
first column comes up, and two rules exist (``group_grid``):

* ``"lazy"`` (default): from the matrix ``W`` as the lazy batch updates left it, i.e. with the
  errors of earlier *blocks* but not of the earlier columns of the current block, and blocks of
  ``block_size`` whatever the group size. This is the reference's rule (IST-DASLab/gptq
  ``fasterquant``, copied by AutoGPTQ and GPTQModel): with it ptqlib's codes equal the
  reference's (tests/quant/test_gptq_reference.py checks them on fixed layers).
* ``"updated"``: from the block's error-updated copy ``W1``, with blocks cut to whole groups so a
  group never straddles one. Every column's error has then reached the grid; ptqlib's rule
  before, kept so its effect can be measured (bench/gptq_benchmark.py, README).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .layers import find_linear_layers, get_decoder_layers, set_module
from .rtn import QUANT_INFO_ATTR, quantlinear_from_linear
from .grid import GROUP_GRIDS
from .uniform import check_bits, dequantize, find_params, n_groups, quantize, rtn_quantize

# true-sequential order inside a Llama/Qwen2/Mistral decoder layer: each group is quantized
# after the previous ones, and sees their *quantized* outputs as its inputs
TRUE_SEQUENTIAL_GROUPS: tuple[tuple[str, ...], ...] = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.up_proj", "mlp.gate_proj"),
    ("mlp.down_proj",),
)


@dataclass
class GPTQResult:
    """Codes ``(out, in)`` long, scales / zeros ``(out, G)`` float32, ``g_idx (in,)``, diagnostics."""

    codes: Tensor
    scales: Tensor
    zeros: Tensor
    g_idx: Tensor
    info: dict[str, Any] = field(default_factory=dict)


class GPTQ:
    """GPTQ for one ``nn.Linear``: accumulate ``H`` from its inputs, then ``quantize``.

    Usage: ``g = GPTQ(layer); h = g.hook(); <run calibration>; h.remove(); res = g.quantize(...)``.
    """

    def __init__(self, layer: nn.Linear) -> None:
        self.layer = layer
        self.columns = layer.in_features
        # H in float32 whatever the model dtype: fp16 sums of x x^T overflow / lose rank
        self.H = torch.zeros(self.columns, self.columns, dtype=torch.float32, device=layer.weight.device)
        self.nsamples = 0

    # ---- step 1: H = (2/N) sum x x^T ---------------------------------------------------------
    @torch.no_grad()
    def add_batch(self, inp: Tensor) -> None:
        """Add the inputs ``(..., in)`` of one forward call to the running mean ``H``."""
        x = inp.reshape(-1, self.columns).to(self.H.device, torch.float32)  # (m, in)
        m = x.shape[0]
        if m == 0:
            return
        # running mean keeps H's scale independent of how many tokens we have seen
        self.H.mul_(self.nsamples / (self.nsamples + m))
        self.nsamples += m
        x = x * math.sqrt(2 / self.nsamples)
        self.H.addmm_(x.t(), x)  # (in, in)

    def hook(self) -> torch.utils.hooks.RemovableHandle:
        """Forward hook on the layer that feeds its inputs to ``add_batch``."""
        return self.layer.register_forward_hook(lambda mod, args, out: self.add_batch(args[0].detach()))

    # ---- steps 4-5: damped Hinv = upper Cholesky of H^-1, with retries ----------------------
    @staticmethod
    def inverse_cholesky(H: Tensor, damp: float, max_damp: float = 10.0) -> tuple[Tensor, dict[str, Any]]:
        """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``.

        If a factorisation fails (H singular to working precision, or non-finite), ``damp`` is
        multiplied by 10 (from 0.01 when it was 0) and we retry while ``damp <= max_damp``.
        If all fail, falls back to ``diag(H)^-1/2``: no error propagation, i.e. RTN for that
        layer. Never raises; ``info`` says what happened.
        """
        n = H.shape[0]
        mean_diag = torch.diag(H).mean()  # a contiguous copy, as the reference: the same summation order
        if not torch.isfinite(mean_diag) or mean_diag <= 0:
            mean_diag = torch.ones((), device=H.device)
        cur, retries = damp, 0
        eye = torch.eye(n, device=H.device, dtype=H.dtype)
        while True:
            Hd = H + (cur * mean_diag) * eye
            L, info = torch.linalg.cholesky_ex(Hd)
            if int(info) == 0 and torch.isfinite(L).all():
                Hinv = torch.cholesky_inverse(L)
                U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
                if int(info) == 0 and torch.isfinite(U).all():
                    return U, {"damp": cur, "damp_retries": retries, "fallback": None}
            nxt = cur * 10 if cur > 0 else 0.01
            if nxt > max_damp:
                break
            cur, retries = nxt, retries + 1
        d = torch.diagonal(H).clone()
        d = torch.where(torch.isfinite(d) & (d > 0), d, torch.ones_like(d))
        return torch.diag(d.rsqrt()), {"damp": cur, "damp_retries": retries, "fallback": "rtn"}

    # ---- steps 2-6 ----------------------------------------------------------------------------
    @torch.no_grad()
    def quantize(
        self,
        bits: int = 4,
        group_size: int = 128,
        sym: bool = False,
        act_order: bool = False,
        static_groups: bool = True,
        damp: float = 0.01,
        block_size: int = 128,
        max_damp: float = 10.0,
        group_grid: str = "lazy",
        sym_grid: str = "full",
    ) -> GPTQResult:
        """Quantize ``layer.weight`` with the accumulated ``H``; the layer itself is not modified.

        ``static_groups`` matters only with ``act_order``: the group grids are then computed on
        the natural column groups before permuting, so ``g_idx`` stays ``i // g`` and kernels
        need no reordering. Without act-order groups are met in column order, and each grid is
        computed when its group starts, by the ``group_grid`` rule (module docstring);
        ``sym_grid`` is ``uniform.find_params``'s symmetric rule.
        """
        check_bits(bits)
        if group_grid not in GROUP_GRIDS:
            raise ValueError(f"group_grid must be one of {GROUP_GRIDS}, got {group_grid!r}")
        W = self.layer.weight.detach().to(torch.float32).clone()  # (out, in)
        out_f, in_f = W.shape
        G = n_groups(in_f, group_size)
        g = in_f // G
        H = self.H.clone()  # working copy; self.H stays the calibration statistic

        # step 2: dead inputs carry no signal: make H invertible there and drop the weights
        dead = torch.diagonal(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0

        grouped = group_size != -1
        static = grouped and act_order and static_groups
        if not grouped:  # one grid per row, from the whole row
            scale, zero = find_params(W, bits, sym, sym_grid)
        if static:  # grids of the natural groups, before any permutation
            static_grids = [find_params(W[:, k * g:(k + 1) * g], bits, sym, sym_grid) for k in range(G)]
            static_group_of: list[int] = []  # per processing position, filled after the permutation

        # step 3: act-order, most "active" inputs (largest H_ii) first
        perm = None
        if act_order:
            perm = torch.argsort(torch.diagonal(H), descending=True, stable=True)
            W, H = W[:, perm], H[perm][:, perm]
            if static:  # a host-side list: no device sync per column in the loop below
                static_group_of = (perm // g).tolist()

        Hinv, info = self.inverse_cholesky(H, damp, max_damp)  # (in, in) upper triangular
        del H

        # "updated": a dynamic group must not straddle a block, as its grid is computed from the
        # block's up-to-date copy W1 (columns right of the block are updated lazily, after it)
        lazy = group_grid == "lazy"
        bs = block_size
        if grouped and not static and not lazy:
            bs = g if g > bs else max(g, bs // g * g)

        Q = torch.zeros(out_f, in_f, dtype=torch.long, device=W.device)
        scales = torch.zeros(out_f, G, device=W.device)
        zeros = torch.zeros(out_f, G, device=W.device)
        for i1 in range(0, in_f, bs):
            i2 = min(i1 + bs, in_f)
            W1 = W[:, i1:i2].clone()  # (out, b)
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            for i in range(i2 - i1):
                col = i1 + i
                if static:
                    scale, zero = static_grids[static_group_of[col]]
                elif grouped and col % g == 0:  # a group starts: its grid
                    src = W[:, col:col + g] if lazy else W1[:, i:i + g]
                    scale, zero = find_params(src, bits, sym, sym_grid)
                    scales[:, col // g], zeros[:, col // g] = scale[:, 0], zero[:, 0]
                w = W1[:, i]  # (out,)
                q = quantize(w.unsqueeze(1), scale, zero, bits).squeeze(1)
                Q[:, col] = q
                err = (w - dequantize(q, scale[:, 0], zero[:, 0])) / Hinv1[i, i]
                # spread the error over the rest of the block: W1[:, i:] -= err Hinv[i, i:]
                W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
                Err1[:, i] = err
            # lazy batch update of everything right of the block
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

        g_idx = torch.arange(in_f, device=W.device) // g
        if not grouped:
            scales, zeros = scale, zero
        elif static:
            scales = torch.cat([s for s, _ in static_grids], dim=1)
            zeros = torch.cat([z for _, z in static_grids], dim=1)
        if perm is not None:
            invperm = torch.argsort(perm)
            Q = Q[:, invperm]
            if not static and grouped:  # group k = processing positions [k g, (k+1) g)
                g_idx = g_idx[invperm]
        info.update(dead_inputs=int(dead.sum()), n_samples=self.nsamples)
        return GPTQResult(Q, scales, zeros, g_idx.to(torch.int32), info)

    def free(self) -> None:
        self.H = None  # type: ignore[assignment]


def relative_output_error(W: Tensor, W_hat: Tensor, H: Tensor) -> float:
    """``||X W^T - X W_hat^T||^2 / ||X W^T||^2`` from ``H`` proportional to ``X^T X`` (no X stored)."""
    D = (W - W_hat).float()
    num = ((D @ H) * D).sum()
    den = ((W.float() @ H) * W.float()).sum()
    return float(num / den.clamp_min(1e-30))


def _relative_output_errors(W: Tensor, W_hats: tuple[Tensor, ...], H: Tensor) -> list[float]:
    """``relative_output_error`` of several ``W_hat`` of one ``W``, its denominator computed once."""
    Wf = W.float()
    den = ((Wf @ H) * Wf).sum().clamp_min(1e-30)
    out = []
    for W_hat in W_hats:
        D = (W - W_hat).float()
        out.append(float(((D @ H) * D).sum() / den))
    return out


# ---- whole model -------------------------------------------------------------------------------
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
    group_size: int = 128,
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

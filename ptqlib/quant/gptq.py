"""GPTQ (Frantar et al., ICLR 2023): second-order weight quantization, layer by layer.

For one linear layer ``W: (out, in)`` with calibration inputs ``X`` (N tokens), GPTQ minimises
``||X W^T - X W_hat^T||^2`` column by column: quantize column ``i``, then spread its error over
the not yet quantized columns with the inverse Hessian ``H^-1``, ``H = (2/N) sum x x^T``
(docs/methods.md). ``GPTQ`` below is that algorithm for one layer; ``gptq_model.gptq_quantize_model``
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
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .grid import GROUP_GRIDS, check_bits, n_groups
from .uniform import find_params

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
        group_size: int = 64,
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

        # codes held as floats until the end (small integers, exact): one op fewer per column
        Q = torch.zeros(out_f, in_f, device=W.device)
        scales = torch.zeros(out_f, G, device=W.device)
        zeros = torch.zeros(out_f, G, device=W.device)
        maxq = 2**bits - 1
        if not grouped:
            s, z = scale[:, 0], zero[:, 0]
        for i1 in range(0, in_f, bs):
            i2 = min(i1 + bs, in_f)
            W1 = W[:, i1:i2].clone()  # (out, b)
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            # the column step below is uniform.quantize / dequantize written out on (out,) vectors,
            # the same operations in the same order (the reference's codes, bit for bit); the loop
            # is op-bound (a few microseconds per op, ~10 ops per column), so every op counts
            for i in range(i2 - i1):
                col = i1 + i
                if static:
                    scale, zero = static_grids[static_group_of[col]]
                    s, z = scale[:, 0], zero[:, 0]
                elif grouped and col % g == 0:  # a group starts: its grid
                    src = W[:, col:col + g] if lazy else W1[:, i:i + g]
                    scale, zero = find_params(src, bits, sym, sym_grid)
                    s, z = scale[:, 0], zero[:, 0]
                    scales[:, col // g], zeros[:, col // g] = s, z
                w = W1[:, i]  # (out,)
                q = torch.round(w / s).add_(z).clamp_(0, maxq)  # quantize
                Q[:, col] = q
                err = (w - s * (q - z)) / Hinv1[i, i]  # (w - dequantize) / d
                # spread the error over the rest of the block: W1[:, i:] -= err Hinv[i, i:]
                W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
                Err1[:, i] = err
            # lazy batch update of everything right of the block
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
        Q = Q.long()

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

"""The learnable quantizer's element-wise work (L4Q, QAT-LoRA), fused into one kernel each by torch.compile.

Forward and backward of the quantizer of :mod:`ptqlib.adapters.l4q` are element-wise passes over
weight-sized fp32 tensors, grouped ``(out, G, g)`` with ``S, b`` broadcast as ``(out, G, 1)``::

    forward    w = (W - b) / S,   w~ = round(clamp(w, Q_N, Q_P)),   W_q = S w~ + b
    backward   m = [Q_N <= w <= Q_P],   Gm = m G_w,   p_S = (w~ - m w) G_w,   p_b = (1 - m) G_w

(``dL/dS`` and ``dL/db`` are the per-group sums of ``p_S`` and ``p_b``.) Eager PyTorch runs each op as its
own pass over memory, the backward's bool-mask ``masked_fill`` slowly: on SmolLM2's 1536 x 576 MLP
weight (AMD Zen 4, 2 threads) the forward's passes take 0.25 ms and the backward's 5.4 ms; compiled, 0.13 and
0.33 ms. :func:`forward_eager` and :func:`backward_eager` are those formulas, compiled by inductor once per process
(``dynamic=True``: one kernel for every layer shape).

**The same numbers.** Each element goes through the same IEEE operations as in the eager path (sub, div,
clamp, round half-to-even, mul, add; inductor's C++ is built without floating-point contraction, so
``S w~ + b`` is not turned into an FMA), so the outputs equal the eager ones bit for bit; the per-group sums
stay eager (``sum(-1)``), because a reduction in another order would not. ``tests/adapters/
test_quantizer_kernels.py`` checks it on square, wide and tall layers at 2, 3, 4 and 8 bits, and L4Q's and
QAT-LoRA's trained weights with either kernel; so the choice stays out of stage ids
(``ptqlib.study.neutral.ID_FREE``).

**Where no compiler works** (no C++ compiler on a CPU, no Triton on a GPU) the first call warns once and the
eager formulas run instead. ``kernel="eager"`` skips the compiler (no start-up cost: the first compile takes
~20 s, later processes read inductor's on-disk cache).

Why not a library: the quantizer is the paper's own (L4Q's learnable S and b, LSQ-style), which no
kernel library ships; torch.compile is the well-kept tool that fuses it.
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor

from ptqlib.adapters import QUANTIZER_KERNELS as KERNELS


def forward_eager(W: Tensor, S: Tensor, b: Tensor, qn: int, qp: int) -> Tensor:
    """``W_q = S round(clamp((W - b) / S, Q_N, Q_P)) + b``. W (out, G, g), S, b (out, G, 1) -> (out, G, g)."""
    wt = torch.round(torch.clamp((W - b) / S, qn, qp))
    return wt * S + b


def backward_eager(W: Tensor, S: Tensor, b: Tensor, Gw: Tensor, qn: int, qp: int
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(W_q, Gm, p_S, p_b)`` from ``W`` and ``G_w = dL/dW_q``, all (out, G, g) (see the module's formulas)."""
    w = (W - b) / S
    wt = torch.round(torch.clamp(w, qn, qp))
    inside = (w >= qn) & (w <= qp)  # clamp mask, inclusive like torch.clamp's gradient
    p_S = (wt - torch.where(inside, w, 0.0)) * Gw  # dW_q/dS = w~ - w inside, Q_N or Q_P (= w~) outside
    p_b = torch.where(inside, 0.0, Gw)  # dW_q/db = 1 outside only
    Gm = torch.where(inside, Gw, 0.0)  # straight-through inside the range, zero where clipped
    return wt * S + b, Gm, p_S, p_b


_compiled: dict[str, object] = {}  # "forward" / "backward" -> the compiled function; "failed" -> the reason


def _compile() -> None:
    """Compile both kernels and run them once on a tiny input (a missing compiler shows here, not mid-step)."""
    fwd = torch.compile(forward_eager, dynamic=True)
    bwd = torch.compile(backward_eager, dynamic=True)
    W, S = torch.linspace(-1, 1, 16).view(2, 2, 4), torch.full((2, 2, 1), 0.25)
    fwd(W, S, torch.zeros_like(S), -8, 7)
    bwd(W, S, torch.zeros_like(S), torch.ones_like(W), -8, 7)
    _compiled.update(forward=fwd, backward=bwd)


def compiled(kernel: str, device: torch.device | None = None):
    """``(forward, backward)`` compiled, for ``kernel`` auto / compiled where a compiler works; else None (the
    caller runs its eager, in-place path; ``auto``: with one warning). Compiled on CPU only (a GPU: None)."""
    if kernel not in KERNELS:
        raise ValueError(f"quantizer_kernel: {kernel!r} is not valid; valid: {', '.join(KERNELS)}")
    if kernel == "eager" or (device is not None and device.type != "cpu"):
        return None
    if "forward" not in _compiled and "failed" not in _compiled:
        try:
            _compile()
        except Exception as e:  # noqa: BLE001 -- any compiler failure (none installed, a broken toolchain)
            _compiled["failed"] = f"{type(e).__name__}: {e}".splitlines()[0]
            if kernel == "auto":
                warnings.warn(f"quantizer_kernel auto: torch.compile failed ({_compiled['failed']}); the quantizer "
                              "runs eager (the same numbers, slower)", RuntimeWarning, stacklevel=2)
    if "failed" in _compiled:
        if kernel == "compiled":
            raise RuntimeError(f"quantizer_kernel compiled: torch.compile failed ({_compiled['failed']}); "
                               "use quantizer_kernel: auto or eager")
        return None
    return _compiled["forward"], _compiled["backward"]

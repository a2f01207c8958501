"""L4Q: quantization-aware fine-tuning with the LoRA update *inside* the quantizer.

Jeon et al., "L4Q: Parameter Efficient Quantization-Aware Fine-Tuning on Large Language
Models" (ACL 2025, arXiv 2402.04902); see ``docs/methods.md``, section L4Q.

Notation (one linear layer, ``y = x W^T``): frozen ``W0 (out, in)``, LoRA ``A (r, in)``,
``B (out, r)``, ``s = alpha / r``; per-group learnable scale ``S`` and offset ``b``,
both ``(out, G)`` with ``G = in / g`` groups of ``g`` consecutive input columns::

    W_comb = W0 + s * B A
    w      = (W_comb - b) / S                       # real-valued code
    w~     = round(clamp(w, Q_N, Q_P))              # signed integer code
    W_q    = S * w~ + b                             # Y = X W_q^T
    Q_N = -2^(n-1),  Q_P = 2^(n-1) - 1

Backward (straight-through estimator with the clamp mask ``m = [Q_N <= w <= Q_P]``)::

    G      = dL/dW_q = dY^T X                       # formed inside backward, freed at once
    dW_q/dS = w~ - w (inside) | Q_N or Q_P (outside)   ==  w~ - m * w
    dW_q/db = 0 (inside) | 1 (outside)                 ==  1 - m
    dL/dA  = s * B^T (m * G),   dL/dB = s * (m * G) A^T,   dL/dX = dY W_q

The autograd Function saves only ``X, W0, A, B, S, b`` -- never ``W_q`` or a weight-sized
gradient -- and recomputes ``W_q`` in backward. So training memory is about LoRA's: one
frozen weight per layer plus activations, instead of also storing ``W_comb``/``W_q``/masks
(several weight-sized tensors per layer, what plain autograd through the fake quantizer keeps).
The compiled path (``quantizer_kernel``: ``ptqlib.adapters.quantizer_kernels``, the same numbers) holds up to
six weight-sized fp32 temporaries of one layer during its backward, the eager in-place path about four.

Numerics: the clamp mask is inclusive (``Q_N <= w <= Q_P``, as torch.clamp's gradient), which
matters because the paper's init puts each group's extreme exactly on ``Q_N`` or ``Q_P``
(there ``dW_q/dS = w~ - w ~ 0`` and the weight gradient passes). ``round`` is half-to-even.
The quantizer runs in fp32 at least, and ``A, B, S, b`` are fp32 parameters even for a
bf16/fp16 ``W0`` (Adam's small updates to S, b would vanish in bf16). Nothing keeps ``S``
positive; with sane learning rates it stays far from 0 (the paper adds no constraint).

After training, every layer is exported to ``ptqlib.quant.qlinear.QuantLinear`` (integer
codes + per-group scale and float zero point): a fully quantized model with no adapter.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ptqlib.quant.grid import SUPPORTED_BITS, effective_group_size, signed_range

from .quantizer_kernels import compiled
from .wrap import export_layers, wrap_linears

__all__ = ["SUPPORTED_BITS", "signed_range", "l4q_init", "fake_quantize", "L4QFunction", "LearnedQuantLinear",
           "L4QLinear", "apply_l4q", "export_l4q", "count_trainable_parameters"]


# ---------------------------------------------------------------------------------------------
# the learnable signed quantizer (shared with ptqlib.adapters.qat_lora)
# ---------------------------------------------------------------------------------------------
def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Quantizer arithmetic runs in fp32 at least (fp16/bf16 would misplace rounding boundaries)."""
    return torch.promote_types(dtype, torch.float32)


def _fresh(t: Tensor, dtype: torch.dtype) -> Tensor:
    """A new contiguous copy of ``t`` in ``dtype`` (ours to overwrite in place)."""
    return torch.empty(t.shape, dtype=dtype, device=t.device).copy_(t)


def l4q_init(W0: Tensor, bits: int, group_size: int) -> tuple[Tensor, Tensor]:
    """Paper init: ``S = max(|min W0| / |Q_N|, |max W0| / Q_P)`` per group, ``b = 0``.

    W0: (out, in) -> S, b: (out, G). The range covers the group's extremes on both sides of
    the (signed, asymmetric) grid without clipping. All-zero groups get a tiny positive S.
    """
    qn, qp = signed_range(bits)
    out_f, in_f = W0.shape
    g = effective_group_size(in_f, group_size)
    Wg = W0.detach().to(compute_dtype(W0.dtype)).reshape(out_f, in_f // g, g)  # (out, G, g)
    S = torch.maximum(Wg.amin(-1).abs() / abs(qn), Wg.amax(-1).abs() / qp)  # (out, G)
    S = S.clamp_min(torch.finfo(S.dtype).tiny ** 0.5)  # avoid 0/0 on dead groups
    return S, torch.zeros_like(S)


def _codes(W: Tensor, S: Tensor, b: Tensor, qn: int, qp: int,
           inplace: bool = False) -> tuple[Tensor, Tensor]:
    """Real code ``w = (W - b) / S`` and integer code ``w~ = round(clamp(w))``, grouped.

    W: (out, in); S, b: (out, G) -> w, w~: (out, G, g). With ``inplace`` (W is a temporary
    of ours) ``w`` reuses W's storage, saving one weight-sized buffer.
    """
    out_f, G = S.shape
    if inplace:
        w = W.view(out_f, G, -1).sub_(b.unsqueeze(-1)).div_(S.unsqueeze(-1))
    else:
        w = (W.reshape(out_f, G, -1) - b.unsqueeze(-1)).div_(S.unsqueeze(-1))
    wt = w.clamp(qn, qp).round_()
    return w, wt


def fake_quantize(W: Tensor, S: Tensor, b: Tensor, bits: int) -> Tensor:
    """Forward value of the quantizer, no gradient: ``S * round(clamp((W - b)/S)) + b``.

    W: (out, in); S, b: (out, G) -> (out, in) in the quantizer's compute dtype.
    """
    qn, qp = signed_range(bits)
    cd = compute_dtype(W.dtype)
    S, b = S.to(cd), b.to(cd)
    w, wt = _codes(W.to(cd), S, b, qn, qp)
    del w
    return wt.mul_(S.unsqueeze(-1)).add_(b.unsqueeze(-1)).reshape(W.shape)


def _ste_grads(
    Gw: Tensor, w: Tensor, wt: Tensor, qn: int, qp: int, need_S: bool, need_b: bool
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """STE gradients of the quantizer from ``Gw = dL/dW_q``; consumes (overwrites) all inputs.

    Gw, w, wt: (out, G, g). Returns ``(m * Gw, dL/dS, dL/db)`` with the masked weight
    gradient (out, G, g) and per-group sums (out, G). In-place ops keep at most three
    weight-sized temporaries alive.
    """
    inside = (w >= qn) & (w <= qp)  # clamp mask, inclusive like torch.clamp's gradient
    outside = ~inside
    dS = db = None
    # masked_fill_ rather than a multiply by the mask: the same values (up to the sign of zeros),
    # without converting a weight-sized bool mask to float first
    if need_S:
        # dW_q/dS = w~ - w inside; outside w~ is already Q_N or Q_P, so it is w~ - m*w.
        w.masked_fill_(outside, 0)
        dS = wt.sub_(w).mul_(Gw).sum(-1)
    del w, wt
    if need_b:
        # dW_q/db = 1 - m: only clipped weights move with the offset.
        db = Gw.masked_fill(inside, 0).sum(-1)
    Gm = Gw.masked_fill_(outside, 0)  # straight-through inside the range, zero where clipped
    return Gm, dS, db


class L4QFunction(torch.autograd.Function):
    """``Y = X W_q^T`` with ``W_q = Q(W0 + s B A; S, b)``, memory-lean custom backward.

    Saves only ``X, W0, A, B, S, b``; ``W_q`` and ``dL/dW_q`` exist only transiently inside
    forward/backward. Non-tensor args: ``scaling = s``, ``qn, qp``, ``grad_scale`` (factor on
    dL/dS, LSQ's ``1/sqrt(g * Q_P)`` when enabled, else 1).
    """

    @staticmethod
    def forward(ctx, x: Tensor, W0: Tensor, A: Tensor, B: Tensor, S: Tensor, b: Tensor,
                scaling: float, qn: int, qp: int, grad_scale: float, kernel: str = "eager") -> Tensor:
        cd = compute_dtype(W0.dtype)
        fused = compiled(kernel, W0.device)
        Wq = _l4q_weight(W0, A, B, S, b, scaling, qn, qp, cd, fused)  # (out, in), transient
        # Under autocast the matmuls run in its dtype, as for any nn.Linear there: x is cast once
        # here and kept cast (half the activation memory), and backward's dY^T X runs in it too.
        dev = x.device.type
        ctx.mm_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        ctx.x_dtype = x.dtype
        if ctx.mm_dtype is not None:
            x = x.to(ctx.mm_dtype)
        y = F.linear(x, Wq.to(x.dtype))  # (..., out)
        del Wq
        ctx.save_for_backward(x, W0, A, B, S, b)
        ctx.scaling, ctx.qn, ctx.qp, ctx.grad_scale, ctx.fused = scaling, qn, qp, grad_scale, fused
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, W0, A, B, S, b = ctx.saved_tensors
        s = ctx.scaling
        need_A, need_B = ctx.needs_input_grad[2:4]
        cd = compute_dtype(W0.dtype)
        Sc, bc = S.to(cd), b.to(cd)

        # Recompute W_comb -> codes instead of having saved them.
        W = _fresh(W0, cd).addmm_(B.to(cd), A.to(cd), alpha=s)  # (out, in)
        quantizer = _grads_fused if ctx.fused is not None and any(ctx.needs_input_grad[2:6]) else _grads_eager
        dx, Gm, dS, db = quantizer(ctx, dy, x, W, Sc, bc)
        del W

        dA = dB = None
        if Gm is not None:
            if need_A:
                dA = (B.to(cd).t() @ Gm).mul_(s).to(A.dtype)  # (r, in)
            if need_B:
                dB = (Gm @ A.to(cd).t()).mul_(s).to(B.dtype)  # (out, r)
            del Gm
        if dS is not None:
            dS = (dS * ctx.grad_scale).to(S.dtype)
        if db is not None:
            db = db.to(b.dtype)
        return dx, None, dA, dB, dS, db, None, None, None, None, None


def _weight_grad(ctx, dy: Tensor, x: Tensor, dtype: torch.dtype) -> Tensor:
    """``dL/dW_q = dY^T X`` over all batch / sequence positions, (out, in) in ``dtype``: computed in autocast's
    dtype when the forward ran under it (the weight gradient of an nn.Linear there), else in the wider of the two."""
    mm = ctx.mm_dtype or torch.promote_types(dy.dtype, x.dtype)
    return (dy.reshape(-1, dy.shape[-1]).t().to(mm) @ x.reshape(-1, x.shape[-1]).to(mm)).to(dtype)


def _grads_eager(ctx, dy: Tensor, x: Tensor, W: Tensor, Sc: Tensor, bc: Tensor) -> tuple:
    """``(dL/dX, m G_w (out, in), dL/dS, dL/db)`` of :meth:`L4QFunction.backward` (the last two per-group sums,
    unscaled; None where not needed) by PyTorch's ops, in place: ``W = W0 + s B A`` (out, in) in the quantizer's
    dtype becomes the real code. ``dL/dW_q`` is formed after ``dL/dX``'s ``W_q`` is freed (fewer at once)."""
    need_x, _, need_A, need_B, need_S, need_b = ctx.needs_input_grad[:6]
    out_f, in_f = W.shape
    w, wt = _codes(W, Sc, bc, ctx.qn, ctx.qp, inplace=True)  # (out, G, g) each; w reuses W
    dx = None
    if need_x:
        Wq = (wt * Sc.unsqueeze(-1)).add_(bc.unsqueeze(-1)).reshape(out_f, in_f)
        dx = (dy @ Wq.to(dy.dtype)).to(ctx.x_dtype)  # dL/dX = dY W_q : (..., in)
        del Wq
    if not (need_A or need_B or need_S or need_b):
        return dx, None, None, None
    Gw = _weight_grad(ctx, dy, x, W.dtype)
    Gm, dS, db = _ste_grads(Gw.view(out_f, Sc.shape[1], -1), w, wt, ctx.qn, ctx.qp, need_S, need_b)
    return dx, Gm.view(out_f, in_f), dS, db


def _grads_fused(ctx, dy: Tensor, x: Tensor, W: Tensor, Sc: Tensor, bc: Tensor) -> tuple:
    """:func:`_grads_eager` with the quantizer's element-wise work in one compiled kernel
    (:mod:`ptqlib.adapters.quantizer_kernels`: the same numbers)."""
    need_x, need_S, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[4], ctx.needs_input_grad[5]
    out_f, in_f = W.shape
    grouped = (out_f, Sc.shape[1], -1)
    Gw = _weight_grad(ctx, dy, x, W.dtype)
    Wq, Gm, p_S, p_b = ctx.fused[1](W.view(grouped), Sc.unsqueeze(-1), bc.unsqueeze(-1), Gw.view(grouped),
                                    ctx.qn, ctx.qp)
    del Gw
    dx = (dy @ Wq.view(out_f, in_f).to(dy.dtype)).to(ctx.x_dtype) if need_x else None  # dL/dX = dY W_q
    return dx, Gm.view(out_f, in_f), p_S.sum(-1) if need_S else None, p_b.sum(-1) if need_b else None


def _l4q_weight(W0: Tensor, A: Tensor, B: Tensor, S: Tensor, b: Tensor, scaling: float,
                qn: int, qp: int, cd: torch.dtype, fused=None) -> Tensor:
    """``W_q = S * round(clamp((W0 + s B A - b)/S)) + b`` as (out, in) in dtype ``cd``; ``fused``: the
    compiled kernels of :func:`ptqlib.adapters.quantizer_kernels.compiled` (None: eager, in place)."""
    W = _fresh(W0, cd).addmm_(B.to(cd), A.to(cd), alpha=scaling)
    Sc, bc = S.to(cd), b.to(cd)
    if fused is not None:
        grouped = (W.shape[0], Sc.shape[1], -1)
        return fused[0](W.view(grouped), Sc.unsqueeze(-1), bc.unsqueeze(-1), qn, qp).view(W0.shape)
    w, wt = _codes(W, Sc, bc, qn, qp, inplace=True)
    del W, w
    return wt.mul_(Sc.unsqueeze(-1)).add_(bc.unsqueeze(-1)).reshape(W0.shape)


# ---------------------------------------------------------------------------------------------
# the layer
# ---------------------------------------------------------------------------------------------
class LearnedQuantLinear(nn.Module):
    """What L4Q and QAT-LoRA layers share: a frozen ``weight`` = W0 (out, in) and ``bias``, a LoRA
    pair ``lora_A`` (r, in) / ``lora_B`` (out, r), and the learnable signed quantizer
    ``q_scale`` = S, ``q_offset`` = b (out, G), initialised by ``l4q_init``.

    Subclasses say where the quantizer sits (L4Q: on ``W0 + s B A``; QAT-LoRA: on ``W0`` with the
    LoRA branch beside it) by their ``forward`` and ``export``.
    """

    def __init__(self, base: nn.Linear, bits: int = 4, group_size: int = 64, rank: int = 4,
                 alpha: float = 8.0, lsq_grad_scale: bool = False, quantizer_kernel: str = "auto") -> None:
        super().__init__()
        self.qn, self.qp = signed_range(bits)
        self.bits = bits
        self.in_features, self.out_features = base.in_features, base.out_features
        self.group_size = -1 if group_size in (-1, None) else int(group_size)  # as QuantLinear
        self.g = effective_group_size(self.in_features, self.group_size)  # columns per group
        self.n_groups = self.in_features // self.g
        self.rank, self.alpha = int(rank), float(alpha)
        self.scaling = self.alpha / self.rank
        self.lsq_grad_scale = lsq_grad_scale
        self.quantizer_kernel = quantizer_kernel  # quantizer_kernels.KERNELS: how, never what, it computes

        W0 = base.weight.detach()
        # Keep W0 under the name "weight" so code that inspects `.weight` (dtype/device) works.
        self.weight = nn.Parameter(W0, requires_grad=False)
        self.bias = None if base.bias is None else nn.Parameter(base.bias.detach(), requires_grad=False)

        # Adapter / quantizer parameters: never below fp32 (tiny Adam updates on S, b, A, B
        # would be lost in bf16), on W0's device.
        pd = compute_dtype(W0.dtype)
        dev = W0.device
        self.lora_A = nn.Parameter(torch.empty(self.rank, self.in_features, device=dev, dtype=pd))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, self.rank, device=dev, dtype=pd))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as LoRA/peft
        S, b = l4q_init(W0, bits, self.g)
        self.q_scale = nn.Parameter(S.to(pd))
        self.q_offset = nn.Parameter(b.to(pd))

    @property
    def grad_scale(self) -> float:
        """LSQ's gradient scale ``1 / sqrt(N * Q_P)``, N = weights sharing one S (= g), or 1."""
        return 1.0 / math.sqrt(self.g * self.qp) if self.lsq_grad_scale else 1.0

    @torch.no_grad()
    def _quantlinear(self, wt: Tensor):
        """A ``QuantLinear`` holding signed codes ``wt`` (out, in) on this layer's grid.

        Signed codes map to QuantLinear's unsigned storage: ``q = w~ - Q_N`` in
        ``[0, 2^n - 1]``, ``scale = S``, ``zero = -Q_N - b / S`` (a float zero point), since
        ``scale * (q - zero) = S * (w~ - Q_N + Q_N + b/S) = S w~ + b``.
        """
        from ptqlib.quant.qlinear import QuantLinear

        S = self.q_scale.detach()
        zeros = -self.qn - self.q_offset.detach() / S  # (out, G) float
        layer = QuantLinear.from_codes(
            # zeros stay fp32 (the fzeros buffer is fp32): a bf16 cast would add rounding the model never trained with
            wt.long() - self.qn, S.to(self.weight.dtype), zeros.float(), g_idx=None,
            bias=None if self.bias is None else self.bias.detach().clone(),
            bits=self.bits, group_size=self.group_size, float_zeros=True,
        )
        return layer.to(self.weight.device)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, rank={self.rank}, alpha={self.alpha}, "
                f"lsq_grad_scale={self.lsq_grad_scale}")


class L4QLinear(LearnedQuantLinear):
    """A frozen linear layer whose weight is ``W_q = Q(W0 + s B A; S, b)`` (L4Q).

    Trainable: ``lora_A`` (r, in), ``lora_B`` (out, r), ``q_scale`` = S (out, G),
    ``q_offset`` = b (out, G). Frozen: ``weight`` = W0 (out, in), optional ``bias`` (out).
    """

    def forward(self, x: Tensor) -> Tensor:  # x: (..., in) -> (..., out)
        y = L4QFunction.apply(x, self.weight, self.lora_A, self.lora_B, self.q_scale,
                              self.q_offset, self.scaling, self.qn, self.qp, self.grad_scale,
                              self.quantizer_kernel)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    @torch.no_grad()
    def integer_codes(self) -> Tensor:
        """Signed codes ``w~`` in ``[Q_N, Q_P]``, (out, in) long."""
        cd = compute_dtype(self.weight.dtype)
        W = _fresh(self.weight, cd).addmm_(self.lora_B.to(cd), self.lora_A.to(cd), alpha=self.scaling)
        _, wt = _codes(W, self.q_scale.to(cd), self.q_offset.to(cd), self.qn, self.qp, True)
        return wt.reshape(W.shape).long()

    @torch.no_grad()
    def merged_quantized_weight(self) -> Tensor:
        """``W_q`` (out, in), exactly what forward multiplies with (compute dtype)."""
        return _l4q_weight(self.weight, self.lora_A, self.lora_B, self.q_scale, self.q_offset,
                           self.scaling, self.qn, self.qp, compute_dtype(self.weight.dtype))

    @torch.no_grad()
    def export(self):
        """A ``QuantLinear`` whose dequantized weight equals ``W_q``; no adapter remains."""
        return self._quantlinear(self.integer_codes())


# ---------------------------------------------------------------------------------------------
# model level (the layer swap itself: ``wrap.py``)
# ---------------------------------------------------------------------------------------------
def apply_l4q(model: nn.Module, bits: int = 4, group_size: int = 64, rank: int = 4,
              alpha: float = 8.0, target_modules: Sequence[str] | None = None,
              lsq_grad_scale: bool = False, quantizer_kernel: str = "auto") -> nn.Module:
    """Replace decoder-layer ``nn.Linear`` layers by ``L4QLinear``, in place; returns ``model``.

    Everything except each layer's ``A, B, S, b`` is frozen (embeddings, norms, lm_head, W0).
    ``quantizer_kernel``: :data:`ptqlib.adapters.quantizer_kernels.KERNELS` (the same numbers either way).
    """
    return wrap_linears(model, L4QLinear, target_modules, bits=bits, group_size=group_size, rank=rank,
                        alpha=alpha, lsq_grad_scale=lsq_grad_scale, quantizer_kernel=quantizer_kernel)


def export_l4q(model: nn.Module) -> nn.Module:
    """Every ``L4QLinear`` -> ``QuantLinear`` (integer codes + S + float zeros), in place."""
    return export_layers(model, L4QLinear)


def count_trainable_parameters(model: nn.Module) -> dict[str, int]:
    """``{"trainable", "total", "lora", "quantizer"}`` parameter counts.

    ``lora`` counts ``lora_A``/``lora_B`` tensors, ``quantizer`` the per-group ``q_scale``/
    ``q_offset`` (L4Q and QAT-LoRA naming); ``total`` counts parameters, not buffers.
    """
    res = {"trainable": 0, "total": 0, "lora": 0, "quantizer": 0}
    for name, p in model.named_parameters():
        res["total"] += p.numel()
        if not p.requires_grad:
            continue
        res["trainable"] += p.numel()
        leaf = name.split(".")[-1]
        if leaf in ("lora_A", "lora_B"):
            res["lora"] += p.numel()
        elif leaf in ("q_scale", "q_offset"):
            res["quantizer"] += p.numel()
    return res

"""QAT-LoRA: the *decoupled* baseline of the L4Q paper (Jeon et al., ACL 2025).

The frozen weight is fake-quantized on its own with a learnable LSQ-style quantizer, and a
separate 16-bit LoRA branch is added beside it::

    W_fq = S * round(clamp((W0 - b) / S, Q_N, Q_P)) + b          # same quantizer as L4Q
    y    = x W_fq^T + s * (x A^T) B^T  (+ bias)                    # s = alpha / r

Trained: ``A, B`` (LoRA) and the per-group ``S, b`` (out, G) (STE with clamp mask, gradients
as in ``ptqlib.adapters.l4q``). Init as L4Q: ``S`` from ``W0``'s group extremes, ``b = 0``,
``A`` Kaiming-uniform, ``B = 0``.

Why it is the decoupled comparison: the deployable artifact is the quantized ``W_fq`` *plus*
the 16-bit LoRA branch. ``B A`` cannot be folded into the integer codes: ``W_fq + s B A`` is
off the quantization grid, and re-quantizing it changes the function the adapter was trained
for (the adapter never saw that rounding). L4Q quantizes ``W0 + s B A`` during training, so
its export is exact. ``export()`` therefore returns ``QuantLinearWithLoRA``: a
``QuantLinear`` of ``W_fq`` and the unmerged LoRA branch.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ptqlib.adapters.l4q import LearnedQuantLinear, _codes, _fresh, _ste_grads, compute_dtype, fake_quantize
from ptqlib.adapters.quantizer_kernels import compiled
from ptqlib.adapters.wrap import export_layers, wrap_linears

__all__ = ["FakeQuantFunction", "QATLoRALinear", "QuantLinearWithLoRA", "apply_qat_lora",
           "export_qat_lora"]


class FakeQuantFunction(torch.autograd.Function):
    """``W_fq = Q(W; S, b)`` with the STE/clamp-mask gradients for ``S, b`` (and ``W``).

    Saves ``W, S, b`` only and recomputes the codes in backward. ``F.linear`` downstream
    still keeps ``W_fq`` and forms ``dL/dW_fq``: that weight-sized cost is inherent to the
    decoupled design (L4Q's fused Function avoids it).
    """

    @staticmethod
    def forward(ctx, W: Tensor, S: Tensor, b: Tensor, qn: int, qp: int, grad_scale: float,
                kernel: str = "eager") -> Tensor:
        cd = compute_dtype(W.dtype)
        ctx.fused = compiled(kernel, W.device)
        if ctx.fused is not None:  # one compiled kernel, the same numbers (ptqlib.adapters.quantizer_kernels)
            grouped = (W.shape[0], S.shape[1], -1)
            Wq = ctx.fused[0](W.to(cd).view(grouped), S.to(cd).unsqueeze(-1), b.to(cd).unsqueeze(-1), qn, qp)
        else:
            w, wt = _codes(W.to(cd), S.to(cd), b.to(cd), qn, qp)
            del w
            Wq = wt.mul_(S.to(cd).unsqueeze(-1)).add_(b.to(cd).unsqueeze(-1))
        ctx.save_for_backward(W, S, b)
        ctx.qn, ctx.qp, ctx.grad_scale = qn, qp, grad_scale
        return Wq.reshape(W.shape).to(W.dtype)

    @staticmethod
    def backward(ctx, dWq: Tensor):
        W, S, b = ctx.saved_tensors
        need_W, need_S, need_b = ctx.needs_input_grad[:3]
        cd = compute_dtype(W.dtype)
        if ctx.fused is not None:
            grouped = (W.shape[0], S.shape[1], -1)
            _, Gm, p_S, p_b = ctx.fused[1](W.to(cd).view(grouped), S.to(cd).unsqueeze(-1), b.to(cd).unsqueeze(-1),
                                           dWq.to(cd).reshape(grouped), ctx.qn, ctx.qp)
            dS, db = (p_S.sum(-1) if need_S else None), (p_b.sum(-1) if need_b else None)
            del p_S, p_b
        else:
            w, wt = _codes(W.to(cd), S.to(cd), b.to(cd), ctx.qn, ctx.qp)
            Gw = _fresh(dWq, cd).view_as(w)  # a copy: _ste_grads overwrites its input
            Gm, dS, db = _ste_grads(Gw, w, wt, ctx.qn, ctx.qp, need_S, need_b)
        dW = Gm.reshape(W.shape).to(W.dtype) if need_W else None
        del Gm
        if dS is not None:
            dS = (dS * ctx.grad_scale).to(S.dtype)
        if db is not None:
            db = db.to(b.dtype)
        return dW, dS, db, None, None, None, None


class QATLoRALinear(LearnedQuantLinear):
    """Fake-quantized frozen ``W0`` (learnable S, b) + a separate fp LoRA branch.

    Trainable: ``lora_A`` (r, in), ``lora_B`` (out, r), ``q_scale`` = S (out, G),
    ``q_offset`` = b (out, G). Frozen: ``weight`` = W0 (out, in), optional ``bias``.
    """

    def quantized_weight(self) -> Tensor:
        """``W_fq`` (out, in), differentiable w.r.t. S and b."""
        return FakeQuantFunction.apply(self.weight, self.q_scale, self.q_offset, self.qn,
                                       self.qp, self.grad_scale, self.quantizer_kernel)

    def forward(self, x: Tensor) -> Tensor:  # (..., in) -> (..., out)
        y = F.linear(x, self.quantized_weight().to(x.dtype),
                     None if self.bias is None else self.bias.to(x.dtype))
        lora = F.linear(F.linear(x, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))  # (..., out)
        return y + self.scaling * lora

    @torch.no_grad()
    def export(self) -> "QuantLinearWithLoRA":
        """``QuantLinear`` of ``W_fq`` (codes ``w~ - Q_N``, fp32 zeros ``-Q_N - b/S``) + LoRA branch."""
        cd = compute_dtype(self.weight.dtype)
        _, wt = _codes(self.weight.to(cd), self.q_scale.detach().to(cd), self.q_offset.detach().to(cd),
                       self.qn, self.qp)
        return QuantLinearWithLoRA(self._quantlinear(wt.reshape(self.weight.shape)), self.lora_A.detach().clone(),
                                   self.lora_B.detach().clone(), self.scaling)

    @torch.no_grad()
    def fake_quantized_weight(self) -> Tensor:
        """``W_fq`` without autograd (compute dtype)."""
        return fake_quantize(self.weight, self.q_scale, self.q_offset, self.bits)


class QuantLinearWithLoRA(nn.Module):
    """Deployable QAT-LoRA layer: ``y = QuantLinear(x) + s * (x A^T) B^T``.

    The LoRA branch stays separate (16-bit, extra matmuls at inference): merging it would
    need a re-quantization of ``W_fq + s B A`` that the training never saw.
    """

    def __init__(self, base: nn.Module, lora_A: Tensor, lora_B: Tensor, scaling: float) -> None:
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.lora_A = nn.Parameter(lora_A, requires_grad=False)  # (r, in)
        self.lora_B = nn.Parameter(lora_B, requires_grad=False)  # (out, r)
        self.scaling = float(scaling)

    def forward(self, x: Tensor) -> Tensor:
        lora = F.linear(F.linear(x, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))
        return self.base(x) + self.scaling * lora


def apply_qat_lora(model: nn.Module, bits: int = 4, group_size: int = 64, rank: int = 4,
                   alpha: float = 8.0, target_modules: Sequence[str] | None = None,
                   lsq_grad_scale: bool = False, quantizer_kernel: str = "auto") -> nn.Module:
    """Replace decoder-layer ``nn.Linear`` by ``QATLoRALinear`` in place; freeze all but A, B, S, b.
    ``quantizer_kernel``: :data:`ptqlib.adapters.quantizer_kernels.KERNELS` (the same numbers either way)."""
    return wrap_linears(model, QATLoRALinear, target_modules, bits=bits, group_size=group_size, rank=rank,
                        alpha=alpha, lsq_grad_scale=lsq_grad_scale, quantizer_kernel=quantizer_kernel)


def export_qat_lora(model: nn.Module) -> nn.Module:
    """Every ``QATLoRALinear`` -> ``QuantLinearWithLoRA`` (QuantLinear + unmerged LoRA), in place."""
    return export_layers(model, QATLoRALinear)


def save_exported(model: nn.Module, model_dir: str | Path, adapter_dir: str | Path, tokenizer=None) -> None:
    """Export (if needed) and save: the quantized base in the GPTQ layout, the LoRA branch apart.

    The base goes through ``save_quantized`` like any RTN / GPTQ model; the branch is a
    safetensors file of ``<layer>.lora_A / .lora_B`` plus the scaling of each layer
    (``ptqlib.adapters.io``, the store the balanced adapters use).
    """
    from ptqlib.adapters.io import save_adapter
    from ptqlib.quant import save_quantized
    from ptqlib.quant.layers import set_module

    export_qat_lora(model)
    wrapped = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinearWithLoRA)}
    tensors, scaling = {}, {}
    for name, m in wrapped.items():
        tensors[f"{name}.lora_A"] = m.lora_A.float()
        tensors[f"{name}.lora_B"] = m.lora_B.float()
        scaling[name] = m.scaling
        set_module(model, name, m.base)  # unwrap: the checkpoint holds plain QuantLinear layers
    save_adapter(adapter_dir, tensors, {"scaling": scaling}, *_FILES)
    save_quantized(model, model_dir, tokenizer=tokenizer)
    for name, m in wrapped.items():  # re-wrap, so the caller's model is unchanged
        set_module(model, name, m)


_FILES = ("qat_lora.safetensors", "qat_lora.json")


def load_exported(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Wrap the ``QuantLinear`` layers of a loaded base with their saved LoRA branches."""
    from ptqlib.adapters.io import load_adapter
    from ptqlib.quant.layers import set_module

    tensors, cfg = load_adapter(adapter_dir, *_FILES)
    for name, s in cfg["scaling"].items():
        base = model.get_submodule(name)
        dev = base.qweight.device
        set_module(model, name, QuantLinearWithLoRA(base, tensors[f"{name}.lora_A"].to(dev),
                                                    tensors[f"{name}.lora_B"].to(dev), s))
    return model

"""EoRA: a training-free low-rank correction of the quantization error in the eigenspace of the layer's
inputs (Liu et al., "EoRA: Training-free Compensation for Compressed LLM with Eigenspace Low-Rank
Approximation", arXiv 2410.21271).

For a linear layer ``y = x W^T`` quantized to ``Q``, with error ``dW = W - Q`` (out, in) and calibration
inputs ``X`` (tokens, in), the correction ``s B A`` (the LoRA form: ``B`` (out, r), ``A`` (r, in), scale
``s = alpha / r``) that matters is the one that minimises the error of the layer's *outputs*::

    min_{rank r}  || (dW - s B A) X^T ||_F^2  =  || (dW - s B A) Q_H L^{1/2} ||_F^2

where ``H = X^T X = Q_H L Q_H^T`` (eigendecomposition; ``L`` the eigenvalues). In the eigenspace
``P = Q_H L^{1/2}`` the problem is a plain low-rank approximation, solved by the SVD (Eckart-Young)::

    dW P = U S V^T        s B = U_r S_r        A = V_r^T P^{-1} = V_r^T L^{-1/2} Q_H^T

so the output error left is ``sum_{i > r} S_i^2`` (:func:`output_error` measures it), the least any
rank-r correction can leave, and at full rank ``s B A = dW``: the corrected layer is the float layer.
An SVD of ``dW`` alone (LoftQ's first step) minimises the *weight* error instead; where the inputs are
far from isotropic (LLM activations have outlier channels) the two differ most.

Eigenvalues below ``eps * max(L)`` are raised to it (``H`` is singular when the calibration has fewer
tokens than the layer has inputs, or dead channels): the directions with no input energy then weigh
almost nothing, and ``P`` stays invertible, so full rank still gives ``dW`` exactly.

CLoQ (Deng et al., "CLoQ: Enhancing Fine-Tuning of Quantized LLMs via Calibrated LoRA Initialization", arXiv
2501.18475) initialises QLoRA from the minimiser of the same calibrated objective, in closed form, then trains:
the product ``s B A`` is this one (the minimiser is unique where ``S_r > S_{r+1}``; any square root of ``H``
gives it). ``split="even"`` puts ``S_r^{1/2}`` on each factor (``s B = U_r S_r^{1/2}``, ``A = S_r^{1/2} V_r^T
P^{-1}``), so the two start at one scale, as PiSSA's factors do, for training; EoRA, which does not train, keeps
``S_r`` on ``B``.

Why not GPTQModel's EoRA: it needs a CUDA torch (see the developers' guide); peft has no EoRA.
"""
from __future__ import annotations

import torch
from torch import Tensor


def eigenbasis(H: Tensor, eps: float = 1e-8) -> tuple[Tensor, Tensor]:
    """``(L^{1/2}, Q_H)`` of ``H = X^T X`` (float64; eigenvalues below ``eps * max(L)`` raised to it)."""
    H64 = H.double()
    H64 = (H64 + H64.T) / 2  # symmetric up to rounding of the accumulation
    L, QH = torch.linalg.eigh(H64)  # ascending eigenvalues
    L = L.clamp_min(eps * L.max().clamp_min(torch.finfo(torch.float64).tiny))
    return L.sqrt(), QH


def eora_factors(dW: Tensor, H: Tensor, rank: int, scale: float = 1.0, eps: float = 1e-8,
                 basis: tuple[Tensor, Tensor] | None = None, split: str = "eora") -> tuple[Tensor, Tensor]:
    """``(A (r, in), B (out, r))`` with ``scale * B @ A`` the rank-``rank`` correction of ``dW`` (out, in) that
    minimises the output error over inputs with second moment ``H = X^T X`` (in, in). float64 inside.
    ``basis``: :func:`eigenbasis` of ``H`` when several layers share it (q, k and v read the same inputs).
    ``split``: ``eora`` (``S_r`` on ``B``) or ``even`` (``S_r^{1/2}`` on each, CLoQ's start; module docstring)."""
    if split not in ("eora", "even"):
        raise ValueError(f"split: {split!r} is not a split; valid: eora, even")
    root, QH = basis if basis is not None else eigenbasis(H, eps)
    U, S, Vh = torch.linalg.svd(dW.double() @ (QH * root), full_matrices=False)  # dW P, P = Q_H L^{1/2}
    r = min(rank, S.numel())
    on_a = S[:r].sqrt() if split == "even" else torch.ones_like(S[:r])
    B = U[:, :r] * (S[:r] / on_a) / scale  # (out, r)
    A = (Vh[:r] * on_a[:, None] / root) @ QH.T  # (r, in): on_a V_r^T L^{-1/2} Q_H^T
    return A.to(dW.dtype), B.to(dW.dtype)


def output_error(residual: Tensor, H: Tensor) -> float:
    """``||residual X^T||_F^2 = tr(residual H residual^T)``: the summed squared output error over the calibration
    inputs of a weight error ``residual`` (out, in)."""
    R = residual.double()
    return float(torch.einsum("oi,ij,oj->", R, H.double(), R))


class InputMoments:
    """Accumulates ``H = X^T X`` of the inputs of named linear layers over forward passes (hooks). Layers that
    read the same input tensor (a block's q, k and v; gate and up) share one ``H`` object, summed once."""

    def __init__(self, model: torch.nn.Module, names: list[str]):
        self.H: dict[str, Tensor] = {}
        self._last: tuple[Tensor, str] | None = None  # the previous hook's input and layer
        mods = dict(model.named_modules())
        self._hooks = [mods[n].register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name: str):
        def hook(mod, inputs, output):
            if self._last is not None and inputs[0] is self._last[0]:  # the same input as the layer before
                self.H.setdefault(name, self.H[self._last[1]])
                return
            self._last = (inputs[0], name)
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()  # (tokens, in)
            if name in self.H:
                self.H[name] += x.T @ x  # in place: layers sharing it see the sum
            else:
                self.H[name] = x.T @ x
        return hook

    def close(self) -> dict[str, Tensor]:
        for h in self._hooks:
            h.remove()
        self._last = None
        return self.H

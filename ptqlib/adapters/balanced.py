"""The balanced low-rank adapter and its layer: Q-BLoRA, QA-LoRA and QA-BLoRA (model level: ``blora.py``).

Notation (docs/methods.md): frozen base ``W0: (out, in)``, nominal LoRA rank ``r``,
scale ``s = alpha / r``. A *balanced* adapter simplifies the adapter's input and output and
spends the saved parameters on rank (Shen et al., arXiv 2407.17029; v1: Q-BaRA / QA-HiRA):

    x (.., in) --avg-pool groups of p inputs--> (.., in/p) --A--> (.., r') --B--> (.., out/k)
      --repeat_interleave(k) on the feature axis--> (.., out),  times s

with pool factor ``p`` and repeat factor ``k``. Its dense equivalent is block-constant:

    dW[i, j] = (s / p) * (B A)[i // k, j // p]                      (out, in)

Variants (all share ``BalancedLoRA``; only the factors and the rank rule differ):

=========  ==================  ======  =========================================  ==========
kind       pool p              repeat  rank                                       mergeable
=========  ==================  ======  =========================================  ==========
qblora     2                   2       r' = 2r (equal params to LoRA-r)           no (exact)
qalora     group size g        1       r (as published: fewer params than LoRA)   yes
qablora    group size g        k (2)   r' raised to LoRA-r's parameter count      yes
=========  ==================  ======  =========================================  ==========

Pool normalisation. The official QA-LoRA and Q-BLoRA code average each block (above); QA-LoRA's
Algorithm 1 sums it (``QA(x) * group_size``, as ModelScope swift does). A sum pool is the average
pool with ``s`` multiplied by ``p`` (``pool_norm="sum"``): the same function family, so the choice
is one of step size. Adam's steps ignore the gradient's scale, so for the same ``A``, ``B`` and
steps the sum moves the adapter's output ``p`` times as far as the average does at equal ``alpha``.

Rank rule. LoRA-r has ``r (in + out)`` parameters; the balanced adapter has
``r' (in/p + out/k)``. With ``match_params`` we take ``r' = floor(r (in + out) / (in/p + out/k))``
(rounded down, so the count never exceeds LoRA-r's; exact when the division is exact, e.g.
``p = k = 2`` gives ``r' = 2r``). Note ``rank(B A) <= min(in/p, out/k, r')``: with ``p = g``
the pooled input is small (SmolLM2: 576/64 = 9), so a raised rank beyond ``in/g`` adds
parameters (and changes the optimisation) but no expressiveness. ``BalancedLoRA.max_rank``
reports the bound.

Merge into a uniform low-bit layer (QA-LoRA / QA-BLoRA). A ``QuantLinear`` holds
``W[o, i] = scale[o, c] * (q[o, i] - zero[o, c])`` with ``c = g_idx[i]``. If ``p`` is a multiple
of the group size ``g`` and every quantization group lies inside one pooling block, then
``dW[o, i] = D[o, c]`` is constant over each (output row, group) cell, and

    W + dW = scale * (q - zero) + D = scale * (q - (zero - D / scale))

so the merge only rewrites the zero points: ``zero' = zero - D / scale`` (fractional, hence
float zero points), with ``D = (s / p) * repeat_interleave(B A, k, dim=0)`` gathered per group.
Codes and scales are untouched, so the merged model keeps its bit width and size (plus float
zeros) and equals base + adapter to float rounding. Q-BLoRA (``p = 2 < g``) varies inside a
group and cannot be folded exactly; nor can any adapter on an NF4/FP4 base (absmax-only
blocks have no offset to fold into).

Where this differs from the official code (xiaocaigou/qbaraqahira, read for understanding):
its QA-HiRA uses input pool 4 and output repeat 8 with a single matrix (no B) and merges
``dW`` into the fp16 model, which yields a 16-bit model, not a low-bit one; pool 4 does not
align with any GPTQ group size, so the zero-point fold above is impossible there. Its Q-BaRA
and QA-HiRA variants share one layer file in which the second assignment overwrites the first
(``AvgPool1d(2)`` then ``AvgPool1d(4)``; Q-BaRA's ``lora_A`` then QA-HiRA's), so running the code
as released mixes the two; its merge script also appears to omit the ``1/p`` of the average pool
(``dW = 0.25 * repeat(B A)`` with ``alpha / r = 16 / 64 = 0.25`` but an ``AvgPool1d`` forward). Here
the factors are explicit parameters, QA-BLoRA pools whole quantization groups (p = g) so the
merge is exact in the low-bit format, and the rank is raised to LoRA-r's parameter count.
The QA-LoRA reference merge subtracts from the int32-*packed* qzeros; we unpack first and
store float zeros.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn as nn
from torch import Tensor

from ptqlib.quant.grid import POOL_NORMS

from .bases import _base_device, _base_group_size, dequantized_weight, is_supported_base
from .merge import merge_into_quantlinear

Kind = Literal["qblora", "qalora", "qablora"]
KINDS: tuple[str, ...] = ("qblora", "qalora", "qablora")
# Fold pool / repeat into the weights while the extra GEMM width r'(1 - 1/f) is at most this
# (see BalancedLoRA.__init__); a speed choice only, both paths are exact.
_FOLD_MAX_EXTRA = 48


# --------------------------------------------------------------------------------------------
# the adapter
# --------------------------------------------------------------------------------------------
def balanced_rank(in_features: int, out_features: int, rank: int, pool: int, repeat: int) -> int:
    """``r' = floor(r (in + out) / (in/p + out/k))``: the largest rank whose parameter count
    ``r' (in/p + out/k)`` does not exceed LoRA-r's ``r (in + out)``."""
    return (rank * (in_features + out_features)) // (in_features // pool + out_features // repeat)


class BalancedLoRA(nn.Module):
    """Balanced adapter ``x -> s * repeat_k(B A avgpool_p(x))`` (see module docstring).

    Args:
        in_features, out_features: sizes of the adapted linear layer.
        rank: nominal LoRA rank ``r``; the scale is ``s = alpha / r`` whatever ``r'`` is.
        alpha: LoRA alpha.
        pool: ``p``, consecutive input features averaged together; must divide ``in``.
        repeat: ``k``, each adapter output feeds ``k`` consecutive outputs; must divide ``out``.
        match_params: raise the rank to ``r' = balanced_rank(...)`` (equal parameters to LoRA-r);
            False keeps ``r' = r`` (QA-LoRA as published).
        dropout: dropout on the pooled input (as in LoRA / the reference code), 0 by default.
        pool_norm: ``"mean"`` averages each pooled block (the official QA-LoRA and Q-BLoRA code's
            ``AvgPool1d``); ``"sum"`` adds it up (QA-LoRA's Algorithm 1, ``QA(x) * group_size``),
            which is ``"mean"`` at ``alpha * p``: for the same ``A``, ``B`` its output is ``p`` times
            as large, and so is each Adam step's change of it.
        name: the layer's name, used in error messages.
        fold: compute pool / repeat by folding them into the weights (True), on the
            activations (False), or pick the faster per layer (None, default); results agree
            to float rounding (dropout > 0 always pools the activations).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        alpha: float,
        pool: int = 2,
        repeat: int = 2,
        *,
        match_params: bool = True,
        dropout: float = 0.0,
        pool_norm: str = "mean",
        name: str = "",
        fold: bool | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        where = f"layer {name!r}" if name else "layer"
        if rank <= 0 or pool <= 0 or repeat <= 0:
            raise ValueError(f"{where}: rank, pool and repeat must be positive, got {rank=}, {pool=}, {repeat=}")
        if in_features % pool != 0 or out_features % repeat != 0:
            raise ValueError(
                f"{where} (in_features={in_features}, out_features={out_features}): pool factor {pool} must divide "
                f"in_features (remainder {in_features % pool}) and repeat factor {repeat} must divide out_features "
                f"(remainder {out_features % repeat})"
            )
        if pool_norm not in POOL_NORMS:
            raise ValueError(f"{where}: pool_norm {pool_norm!r} is not one of {', '.join(POOL_NORMS)}")
        self.in_features, self.out_features = in_features, out_features
        self.pool, self.repeat, self.pool_norm = pool, repeat, pool_norm
        self.rank, self.alpha = rank, float(alpha)
        self.match_params = match_params
        self.rank_eff = balanced_rank(in_features, out_features, rank, pool, repeat) if match_params else rank
        # s = alpha / r, with the nominal r (paper and official code); a sum pool is the average
        # pool times p, carried in s so that every formula below (dW = (s/p) B A) stays as it is
        self.scale = self.alpha / rank * (pool if pool_norm == "sum" else 1)
        self.name = name
        # A: (r', in/p), B: (out/k, r') -- nn.Linear weight layout, so B @ A is (out/k, in/p).
        self.lora_A = nn.Parameter(torch.empty(self.rank_eff, in_features // pool, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features // repeat, self.rank_eff, device=device, dtype=dtype))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # Two exact ways to compute the pool and the repeat: on the activations (avg-pool /
        # broadcast, fewer FLOPs) or folded into the weights (A repeated p times along its input,
        # B k times along its output: one plain GEMM each, more FLOPs). The thin adapter GEMMs are
        # memory-bound, and reductions over a size-p axis are slow, so folding wins while the
        # extra GEMM width r'(1 - 1/f) is small. Measured on CPU (fp32, SmolLM2 shapes, fwd+bwd):
        # p = k = 2 with r' = 32 folded is ~2x faster than on the activations and within ~25% of
        # LoRA-r; p = 64, r' >= 48 is faster pooled; k = 8, r' = 128 faster broadcast.
        auto_in = self.rank_eff * (1 - 1 / pool) <= _FOLD_MAX_EXTRA and dropout == 0
        auto_out = self.rank_eff * (1 - 1 / repeat) <= _FOLD_MAX_EXTRA
        self.expand_in = pool > 1 and (auto_in if fold is None else fold and dropout == 0)
        self.expand_out = repeat > 1 and (auto_out if fold is None else fold)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """A Kaiming-uniform (as nn.Linear / LoRA), B = 0, so the adapter starts as a no-op."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    @property
    def max_rank(self) -> int:
        """Upper bound on ``rank(dW)``: ``min(r', in/p, out/k)``."""
        return min(self.rank_eff, self.in_features // self.pool, self.out_features // self.repeat)

    def num_parameters(self) -> int:
        return self.lora_A.numel() + self.lora_B.numel()

    def _hidden(self, x: Tensor) -> Tensor:
        """``s * A avgpool_p(x)``: (.., in) -> (.., r')."""
        x = x.to(self.lora_A.dtype)
        if self.expand_in:
            # avgpool_p then A == x @ (repeat_interleave(A, p, dim=1) / p).T: one GEMM, no reduction
            h = x @ (self.lora_A.repeat_interleave(self.pool, dim=1) * (1.0 / self.pool)).t()
        else:
            if self.pool > 1:
                x = x.unflatten(-1, (self.in_features // self.pool, self.pool)).mean(-1)  # (.., in/p)
            h = self.dropout(x) @ self.lora_A.t()
        return h * self.scale  # scale the thinnest tensor (r' wide)

    def _b_expanded(self) -> Tensor:
        """``repeat_interleave(B, k, dim=0)``: (out, r'), so B then repeat_k is one GEMM."""
        return self.lora_B.repeat_interleave(self.repeat, dim=0) if self.repeat > 1 else self.lora_B

    def forward(self, x: Tensor) -> Tensor:
        """(.., in) -> (.., out)."""
        h = self._hidden(x)
        if self.expand_out or self.repeat == 1:
            return h @ self._b_expanded().t()
        return (h @ self.lora_B.t()).repeat_interleave(self.repeat, dim=-1)

    def add_to(self, y: Tensor, x: Tensor) -> Tensor:
        """``y + forward(x)``; the reduced path broadcasts over (.., out/k, k) instead of
        materialising repeat_interleave (its backward is then a plain sum)."""
        h = self._hidden(x)
        if self.expand_out or self.repeat == 1:
            return y + (h @ self._b_expanded().t()).to(y.dtype)
        z = (h @ self.lora_B.t()).to(y.dtype)  # (.., out/k)
        yk = y.unflatten(-1, (self.out_features // self.repeat, self.repeat))  # (.., out/k, k)
        return (yk + z.unsqueeze(-1)).flatten(-2)

    def reduced_delta(self) -> Tensor:
        """``(s / p) * B A``: (out/k, in/p), the value of each (k x p) block of dW."""
        return (self.lora_B @ self.lora_A) * (self.scale / self.pool)

    def delta_weight(self) -> Tensor:
        """Dense equivalent ``dW[i, j] = (s/p) (B A)[i // k, j // p]``: (out, in)."""
        d = self.reduced_delta()
        return d.repeat_interleave(self.repeat, dim=0).repeat_interleave(self.pool, dim=1)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, pool={self.pool}, repeat={self.repeat}, "
            f"r={self.rank}, r'={self.rank_eff}, alpha={self.alpha:g}, s={self.scale:g}, pool_norm={self.pool_norm}, "
            f"fold_in={self.expand_in}, fold_out={self.expand_out}"
        )


# --------------------------------------------------------------------------------------------
# wrapper on a frozen (quantized) base
# --------------------------------------------------------------------------------------------
class QBLoRALinear(nn.Module):
    """``y = base(x) + adapter(x)`` with a frozen base (QuantLinear, bnb Linear4bit, nn.Linear).

    Variants by factors: Q-BLoRA ``pool=2, repeat=2``; QA-LoRA ``pool=g, repeat=1,
    match_params=False``; QA-BLoRA ``pool=g, repeat=k`` (rank raised). ``kind`` is a label
    that ``merge()`` and ``save_adapters`` use; ``QBLoRALinear.for_kind`` fills in the factors.
    """

    def __init__(
        self,
        base: nn.Module,
        rank: int,
        alpha: float,
        pool: int = 2,
        repeat: int = 2,
        *,
        match_params: bool = True,
        dropout: float = 0.0,
        pool_norm: str = "mean",
        kind: str = "qblora",
        name: str = "",
        fold: bool | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if not is_supported_base(base):
            raise TypeError(f"layer {name!r}: unsupported base {type(base).__name__} (QuantLinear, Linear4bit, nn.Linear)")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.kind = kind
        self.name = name
        self.in_features, self.out_features = int(base.in_features), int(base.out_features)
        self.adapter = BalancedLoRA(
            self.in_features, self.out_features, rank, alpha, pool, repeat,
            match_params=match_params, dropout=dropout, pool_norm=pool_norm, name=name, fold=fold,
            device=_base_device(base), dtype=dtype,
        )

    @classmethod
    def for_kind(
        cls,
        base: nn.Module,
        kind: Kind,
        rank: int,
        alpha: float,
        pool: int | None = None,
        repeat: int | None = None,
        *,
        dropout: float = 0.0,
        pool_norm: str = "mean",
        name: str = "",
        dtype: torch.dtype = torch.float32,
    ) -> "QBLoRALinear":
        """Build with the factor defaults of ``kind`` (group size from a QuantLinear base)."""
        pool, repeat, match = default_factors(kind, base, pool, repeat, name)
        return cls(base, rank, alpha, pool, repeat, match_params=match, dropout=dropout, pool_norm=pool_norm,
                   kind=kind, name=name, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.adapter.add_to(self.base(x), x)

    def delta_weight(self) -> Tensor:
        return self.adapter.delta_weight()

    def merge(self) -> nn.Module:
        """The merged low-bit ``QuantLinear`` (float zero points); see ``merge_into_quantlinear``."""
        g = _base_group_size(self.base)
        if self.kind == "qblora" and (g is None or self.adapter.pool % g != 0):
            raise ValueError(
                f"layer {self.name!r}: Q-BLoRA (pool {self.adapter.pool}) cannot be merged exactly into a "
                "low-bit base: its dW varies inside each quantization group, so folding it in needs a lossy "
                "re-quantization. Deploy base + adapter, or use merged_dense() for a 16-bit model."
            )
        return merge_into_quantlinear(self.base, self.adapter, name=self.name)

    @torch.no_grad()
    def merged_dense(self, dtype: torch.dtype = torch.float32) -> nn.Linear:
        """``nn.Linear`` with ``W0_hat + dW`` (the official code's fp16 merge; not low-bit)."""
        w = dequantized_weight(self.base).float() + self.delta_weight().float()
        bias = getattr(self.base, "bias", None)
        lin = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device=w.device, dtype=dtype)
        lin.weight.copy_(w.to(dtype))
        if bias is not None:
            lin.bias.copy_(bias.to(dtype))
        return lin

    def extra_repr(self) -> str:
        return f"kind={self.kind}"


def default_factors(
    kind: str, base: nn.Module, pool: int | None, repeat: int | None, name: str = ""
) -> tuple[int, int, bool]:
    """(pool, repeat, match_params) for ``kind``; ``pool`` defaults to the base's group size
    for the quantization-aware kinds."""
    if kind not in KINDS:
        raise ValueError(f"unknown adapter kind {kind!r}; valid: {', '.join(KINDS)}")
    if kind == "qblora":
        return (2 if pool is None else pool), (2 if repeat is None else repeat), True
    if pool is None:
        pool = _base_group_size(base)
        if pool is None:
            raise ValueError(
                f"layer {name!r}: {kind} pools whole quantization groups, but the base is "
                f"{type(base).__name__}, not a QuantLinear: pass pool= explicitly"
            )
    if kind == "qalora":
        return pool, (1 if repeat is None else repeat), False
    return pool, (2 if repeat is None else repeat), True

"""``QuantLinear``: the one weight-only quantized linear layer of ptqlib.

``y = x @ W_hat.T + bias`` with ``W_hat[o, i] = scales[g_idx[i], o] * (q[o, i] - zeros[g_idx[i], o])``.

Storage is the GPTQ ecosystem checkpoint layout (see ``pack``): ``qweight`` int32
``(in*b/32, out)``, ``qzeros`` int32 ``(G, out*b/32)`` (v1: holds ``zero - 1``), ``scales``
``(G, out)``, ``g_idx`` int32 ``(in,)``, optional ``bias (out,)``; all are buffers, so nothing
here is trainable and the state dict is directly a GPTQ checkpoint. Models whose zero points
became fractional (QA-LoRA / QA-BLoRA merges, L4Q export) hold them in a float buffer
``fzeros (G, out)`` instead of ``qzeros`` (``float_zeros=True``); fzeros are kept in float32
because after a merge they carry the adapter's whole contribution.

In training, forward dequantizes the full weight on every call, in the input's dtype and on its device,
and caches nothing weight-sized: memory stays at the packed size between calls, which is the
point of a quantized base under LoRA training. That costs one unpack per call and another in backward
(about 5% of a QLoRA step on SmolLM2 on a 2-core CPU); :func:`kept_dequantized` trades it for memory, keeping
each layer's de-quantized weight across the steps (the same numbers: the codes are frozen). A fused kernel
(GPTQModel / vLLM) is the deployment path.

There is deliberately no ``.weight`` attribute: writes to a dequantized copy would be silently
lost, and peft then sees the int32 ``qweight`` and keeps LoRA adapters in float32 (as for GPTQ).
Use ``dequantize_weight()``.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor, nn

from .grid import check_bits, n_groups
from .pack import pack_qweight, pack_qzeros, unpack_qweight, unpack_qzeros


class _DequantMatmul(torch.autograd.Function):
    """``y = x @ W_hat.T`` that saves no tensor for backward and de-quantizes again there.

    The codes are frozen, so only ``dL/dx = dL/dy @ W_hat`` is needed (not ``x``); keeping the de-quantized
    weight alive between forward and backward would cost the float size of every layer (what
    QLoRA on a 4-bit base is meant to save). Recomputing it is one more de-quantization per layer.
    """

    @staticmethod
    def forward(ctx, x: Tensor, layer: "QuantLinear") -> Tensor:
        ctx.layer = layer
        return torch.matmul(x, layer.training_weight_t(x.dtype))

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None
        w_t = ctx.layer.training_weight_t(grad_y.dtype)  # (in, out)
        return torch.matmul(grad_y, w_t.t()), None


class QuantLinear(nn.Module):
    """Weight-only quantized ``nn.Linear`` replacement (GPTQ layout, dequantizing forward).

    Without gradients (evaluation, generation) the de-quantized weight is cached per layer,
    keyed on the buffers' version counters, so in-place edits or new zero points invalidate it:
    CPUs have no fused low-bit matmul, and de-quantizing the whole model for every generated
    token would make generation 10x slower than the matmuls. Set ``cache_dequantized = False``
    (class or instance) to trade that speed for memory.
    """

    cache_dequantized: bool = True
    keep_in_training: bool = False  # also keep it in training (kept_dequantized): the same numbers, its float size

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        bias: bool = True,
        float_zeros: bool = False,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        check_bits(bits)
        G = n_groups(in_features, group_size)
        if (in_features * bits) % 32 or (out_features * bits) % 32:
            raise ValueError(f"in ({in_features}) and out ({out_features}) * bits must be multiples of 32")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        self.float_zeros = float_zeros
        g = in_features // G
        self.register_buffer("qweight", torch.zeros(in_features * bits // 32, out_features, dtype=torch.int32, device=device))
        if float_zeros:
            self.register_buffer("fzeros", torch.zeros(G, out_features, dtype=torch.float32, device=device))
        else:
            self.register_buffer("qzeros", torch.zeros(G, out_features * bits // 32, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.zeros(G, out_features, dtype=dtype, device=device))
        self.register_buffer("g_idx", (torch.arange(in_features, device=device) // g).to(torch.int32))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.bias = None

    @property
    def n_groups(self) -> int:
        return self.scales.shape[0]

    # ---- construction ---------------------------------------------------------------------
    @classmethod
    def from_codes(
        cls,
        codes: Tensor,
        scales: Tensor,
        zeros: Tensor,
        g_idx: Tensor | None = None,
        bias: Tensor | None = None,
        bits: int = 4,
        group_size: int | None = None,
        float_zeros: bool = False,
    ) -> "QuantLinear":
        """Build from codes ``(out, in)``, scales / zeros ``(out, G)`` (transposed to storage).

        ``group_size=None`` infers ``in // G`` (``-1`` when ``G == 1``). ``g_idx (in,)`` maps
        each input column to its group (default ``i // g``; act-order without static groups
        gives a permuted one). Scales keep their dtype, which becomes the layer's dtype.
        """
        out_f, in_f = codes.shape
        G = scales.shape[1]
        if group_size is None:
            group_size = -1 if G == 1 else in_f // G
        if n_groups(in_f, group_size) != G or zeros.shape != scales.shape or scales.shape[0] != out_f:
            raise ValueError(f"shapes disagree: codes {tuple(codes.shape)}, scales {tuple(scales.shape)}, "
                             f"zeros {tuple(zeros.shape)}, group_size {group_size}")
        if not float_zeros and not torch.equal(zeros, torch.round(zeros)):
            raise ValueError("fractional zero points need float_zeros=True")
        dtype = scales.dtype if scales.is_floating_point() else torch.float16
        layer = cls(in_f, out_f, bits, group_size, bias=bias is not None, float_zeros=float_zeros,
                    dtype=dtype, device=codes.device)
        layer.qweight.copy_(pack_qweight(codes, bits))
        layer.scales.copy_(scales.t())
        if float_zeros:
            layer.fzeros.copy_(zeros.t())
        else:
            layer.qzeros.copy_(pack_qzeros(zeros.t(), bits))
        if g_idx is not None:
            layer.g_idx.copy_(g_idx.to(torch.int32))
        if bias is not None:
            layer.bias.copy_(bias)
        return layer

    def set_float_zeros(self, zeros: Tensor) -> None:
        """Switch to (or update) float zero points ``zeros (out, G)``; drops ``qzeros``."""
        if zeros.shape != (self.out_features, self.n_groups):
            raise ValueError(f"zeros must be (out, G) = {(self.out_features, self.n_groups)}, got {tuple(zeros.shape)}")
        fz = zeros.detach().t().to(device=self.scales.device, dtype=torch.float32).contiguous()
        if self.float_zeros:
            self.fzeros.copy_(fz)
            return
        del self.qzeros  # removes the buffer; a float-zero layer has no qzeros in its state dict
        self.register_buffer("fzeros", fz)
        self.float_zeros = True

    @torch.no_grad()
    def fold_group_offset(self, D: Tensor, name: str = "") -> "QuantLinear":
        """A copy computing ``W + D[o, g_idx[i]]``: a constant ``D (out, G)`` per (row, group) cell
        folded into the zero points, ``zero' = zero - D / scale`` (``W = scale (q - zero)``).

        Codes, scales, g_idx and bias are unchanged; the zero points become float (the
        ``ptqlib_fzeros`` checkpoint format). This is how QA-LoRA / QA-BLoRA merge into a low-bit
        layer (``ptqlib.adapters.balanced.merge_into_quantlinear`` computes ``D``).
        """
        import copy

        if D.shape != (self.out_features, self.n_groups):
            raise ValueError(f"layer {name!r}: D must be (out, G) = {(self.out_features, self.n_groups)}, "
                             f"got {tuple(D.shape)}")
        zeros = self.zero_points()  # (out, G)
        scales = self.scales.t().float()  # storage (G, out) -> (out, G)
        D = D.float().to(zeros.device)
        if (scales == 0).any():
            if ((scales == 0) & (D != 0)).any():
                raise ValueError(f"layer {name!r}: a group has scale 0, a nonzero offset cannot be folded into its zero point")
            scales = torch.where(scales == 0, torch.ones_like(scales), scales)
        merged = copy.deepcopy(self)
        merged.set_float_zeros(zeros - D / scales)
        return merged

    # ---- views of the stored weight ---------------------------------------------------------
    def unpack_codes(self) -> Tensor:
        """Codes ``q (out, in)`` as long."""
        return unpack_qweight(self.qweight, self.bits).t().long()

    def zero_points(self) -> Tensor:
        """Zero points ``(out, G)`` as float32 (integers unless ``float_zeros``)."""
        if self.float_zeros:
            return self.fzeros.t().float()
        return unpack_qzeros(self.qzeros, self.bits).t().float()

    def _zeros_storage(self) -> Tensor:
        """Zero points in storage orientation ``(G, out)``."""
        if self.float_zeros:
            return self.fzeros
        return unpack_qzeros(self.qzeros, self.bits)

    def dequantize_weight_t(self, dtype: torch.dtype | None = None) -> Tensor:
        """``W_hat.T (in, out)`` (storage orientation, so ``x @ W_hat.T`` needs no transpose)."""
        dtype = dtype or self.scales.dtype
        q = unpack_qweight(self.qweight, self.bits)  # (in, out) int32, ours to overwrite
        G = self.n_groups
        g = self.in_features // G
        if torch.equal(self.g_idx, self._contiguous_g_idx()):
            # groups are runs of g consecutive columns: broadcast (G, 1, out) over (G, g, out).
            # In place where exact: integer zero points are subtracted in int32 (q - z is a small
            # integer, exact in every float dtype, as the float subtraction of the two would be).
            scales = self.scales.to(dtype).unsqueeze(1)
            if self.float_zeros:
                w = q.view(G, g, self.out_features).to(dtype).sub_(self.fzeros.to(dtype).unsqueeze(1))
            else:
                w = q.view(G, g, self.out_features).sub_(self._zeros_storage().unsqueeze(1)).to(dtype)
            return w.mul_(scales).view(self.in_features, -1)
        gi = self.g_idx.long()  # act-order: any column may belong to any group
        return (q.to(dtype) - self._zeros_storage().to(dtype)[gi]) * self.scales.to(dtype)[gi]

    def _contiguous_g_idx(self) -> Tensor:
        g = self.in_features // self.n_groups
        return torch.arange(self.in_features, device=self.g_idx.device, dtype=torch.int32) // g

    def _cached_weight_t(self, dtype: torch.dtype) -> Tensor:
        zeros = self.fzeros if self.float_zeros else self.qzeros
        key = (dtype, self.qweight.device, self.float_zeros,
               *((t.data_ptr(), t._version) for t in (self.qweight, zeros, self.scales, self.g_idx)))
        cache = getattr(self, "_w_cache", None)
        if cache is None or cache[0] != key:
            cache = (key, self.dequantize_weight_t(dtype))
            self._w_cache = cache
        return cache[1]

    def training_weight_t(self, dtype: torch.dtype) -> Tensor:
        """``W_hat.T`` for a training forward or backward: kept across calls under ``keep_in_training``."""
        return self._cached_weight_t(dtype) if self.keep_in_training else self.dequantize_weight_t(dtype)

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """``W_hat (out, in)`` in ``dtype`` (default: the scales' dtype)."""
        return self.dequantize_weight_t(dtype).t()

    def forward(self, x: Tensor) -> Tensor:
        # x: (..., in) -> (..., out); de-quantize in the dtype the matmul runs in: x's, or autocast's
        # when it is on (the forward and backward then multiply by the same W_hat, and no float32
        # copy of the weight is made only to be cast down)
        if torch.is_autocast_enabled(x.device.type) and x.is_floating_point():
            x = x.to(torch.get_autocast_dtype(x.device.type))
        if torch.is_grad_enabled():
            if not self.keep_in_training:
                self._w_cache = None  # training: never hold a float copy of the weight
            y = _DequantMatmul.apply(x, self)
        elif self.cache_dequantized:
            y = torch.matmul(x, self._cached_weight_t(x.dtype))
        else:
            y = torch.matmul(x, self.dequantize_weight_t(x.dtype))
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y

    def _apply(self, fn, recurse: bool = True):
        # model.to(bf16) / .half() casts every float buffer; float zero points must stay float32
        # (a merged zero like 7.63 would move by up to 0.03 steps in bf16), so only move them.
        fz = self.fzeros if self.float_zeros else None
        super()._apply(fn, recurse)
        if fz is not None and self.fzeros.dtype != torch.float32:
            self.fzeros = fz.to(self.fzeros.device)
        return self

    # ---- bookkeeping ------------------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes this layer stores (qweight, zeros, scales, g_idx, bias): its checkpoint size."""
        return sum(b.numel() * b.element_size() for b in self.buffers(recurse=False))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}, float_zeros={self.float_zeros}, "
                f"dtype={self.scales.dtype}")


def quantized_nbytes(model: nn.Module) -> int:
    """Bytes of a model as stored: parameters + persistent buffers (packed codes count packed).

    Tied parameters are counted once (deduplicated by storage).
    """
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + [b for _, b in _persistent_buffers(model)]:
        key = t.untyped_storage().data_ptr() if t.device.type != "meta" else id(t)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def _persistent_buffers(model: nn.Module):
    for mod_name, mod in model.named_modules():
        for name, buf in mod.named_buffers(recurse=False):
            if buf is not None and name not in mod._non_persistent_buffers_set:
                yield f"{mod_name}.{name}", buf


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every ``QuantLinear`` by an fp32 ``nn.Linear`` holding its de-quantized weight (in place).

    What merging an adapter into a float copy needs (a QuantLinear cannot absorb a dense update).
    """
    from .layers import set_module

    for name, mod in list(model.named_modules()):
        if isinstance(mod, QuantLinear):
            lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None,
                            device=mod.scales.device, dtype=torch.float32)
            with torch.no_grad():
                lin.weight.copy_(mod.dequantize_weight(torch.float32))
                if mod.bias is not None:
                    lin.bias.copy_(mod.bias)
            set_module(model, name, lin)
    if getattr(getattr(model, "config", None), "quantization_config", None) is not None:
        del model.config.quantization_config
    return model


@contextlib.contextmanager
def kept_dequantized(model: nn.Module, keep: bool = True) -> Iterator[list[int]]:
    """Within the block every ``QuantLinear`` of ``model`` keeps its de-quantized weight across training steps
    (``keep``), instead of de-quantizing in every forward and backward: the same products bit for bit (the codes
    are frozen), one de-quantization per layer instead of two a step, for the float size of the weights. Yields
    a list that holds, once the block ends, the bytes those weights took; the copies are dropped then."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)] if keep else []
    held: list[int] = []
    for m in layers:
        m.keep_in_training = True
    try:
        yield held
    finally:
        held.append(sum(m._w_cache[1].numel() * m._w_cache[1].element_size() for m in layers
                        if getattr(m, "_w_cache", None) is not None))
        for m in layers:
            m.keep_in_training = False
            m._w_cache = None

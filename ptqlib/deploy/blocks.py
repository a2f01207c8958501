"""ggml's Q4_1 and Q8_0 blocks (32 weights with an fp16 scale, and for Q4_1 an fp16 minimum) from
``QuantLinear`` codes, exactly where the codes allow (:func:`exact_type`), and the row order llama.cpp's
rotary embedding expects (:func:`_rope_rows`)."""
from __future__ import annotations

import numpy as np
import torch

from ptqlib.quant.qlinear import QuantLinear

from .types import ExportError

QK = 32  # weights per ggml block (Q4_1, Q8_0)


def pack_q4_1(codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> np.ndarray:
    """Q4_1 blocks of codes ``(out, in)`` in [0, 15] with per-block ``d``, ``m`` ``(out, in/32)``.

    -> uint8 ``(out, in/32 * 20)``: per block fp16 ``d``, fp16 ``m``, then 16 bytes whose low
    nibbles hold weights 0..15 of the block and high nibbles weights 16..31 (ggml's block_q4_1).
    """
    out_f, in_f = codes.shape
    nb = in_f // QK
    q = codes.to(torch.uint8).reshape(out_f, nb, QK).numpy()
    qs = q[..., :16] | (q[..., 16:] << 4)  # (out, nb, 16)
    dm = np.stack([d.to(torch.float16).numpy(), m.to(torch.float16).numpy()], axis=-1)  # (out, nb, 2)
    return np.concatenate([dm.view(np.uint8).reshape(out_f, nb, 4), qs], axis=-1).reshape(out_f, nb * 20)


def pack_q8_0(q: torch.Tensor, d: torch.Tensor) -> np.ndarray:
    """Q8_0 blocks of int8 values ``q (out, in)`` with per-block ``d (out, in/32)``.

    -> uint8 ``(out, in/32 * 34)``: per block fp16 ``d`` then 32 int8 (ggml's block_q8_0).
    """
    out_f, in_f = q.shape
    nb = in_f // QK
    qs = q.to(torch.int8).reshape(out_f, nb, QK).numpy().view(np.uint8)
    dd = d.to(torch.float16).numpy().reshape(out_f, nb, 1).view(np.uint8).reshape(out_f, nb, 2)
    return np.concatenate([dd, qs], axis=-1).reshape(out_f, nb * 34)


def _block_grid(layer: QuantLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-32-block scale and zero point ``(out, in/32)`` of a layer with contiguous groups."""
    g = layer.in_features // layer.n_groups
    rep = g // QK
    s = layer.scales.t().float().repeat_interleave(rep, dim=1)
    z = layer.zero_points().repeat_interleave(rep, dim=1)
    return s, z


def exact_type(layer: QuantLinear) -> tuple[str | None, str]:
    """The GGUF type that holds ``layer``'s codes exactly (``Q4_1`` / ``Q8_0``), or (None, why not)."""
    g = layer.in_features // layer.n_groups
    if not torch.equal(layer.g_idx, layer._contiguous_g_idx()):
        return None, ("act-order permutes the columns (g_idx is not contiguous) and GGUF blocks store no "
                      "permutation; quantize with desc_act: false, or with static_groups: true")
    if g % QK:
        return None, f"group size {g} is not a multiple of {QK}, the GGUF block size"
    if layer.bits <= 4:
        return "Q4_1", ""
    z = layer.zero_points()
    if not layer.float_zeros and bool((z == 128).all()):
        return "Q8_0", ""
    return None, "asymmetric 8-bit codes have no GGUF weight type (Q8_0 is symmetric)"


def encode_exact(layer: QuantLinear, gtype: str) -> tuple[np.ndarray, float]:
    """The layer's codes in ``gtype`` blocks -> (bytes, max |w_gguf - w_ptqlib|)."""
    codes = layer.unpack_codes()
    s, z = _block_grid(layer)
    w = layer.dequantize_weight(torch.float32)
    if gtype == "Q4_1":
        d, m = s, -s * z
        data = pack_q4_1(codes, d, m)
        d16 = d.half().float().repeat_interleave(QK, 1)
        w_g = d16 * codes.float() + (m.half().float().repeat_interleave(QK, 1))
    elif gtype == "Q8_0":
        q = codes - 128
        data = pack_q8_0(q, s)
        w_g = s.half().float().repeat_interleave(QK, 1) * q.float()
    else:
        raise ExportError(f"no exact encoding into {gtype}")
    return data, float((w_g - w).abs().max())


def encode_float(w: torch.Tensor, gtype: str) -> tuple[np.ndarray, float]:
    """A float weight ``(out, in)`` in ``gtype`` (F16 / F32 / re-quantized Q4_1 or Q8_0) -> (data, max error)."""
    import gguf

    w32 = w.detach().float().cpu()
    if gtype == "F32":
        return w32.numpy(), 0.0
    if gtype == "F16":
        data = w32.half().numpy()
        return data, float((torch.from_numpy(data.astype(np.float32)) - w32).abs().max())
    qtype = getattr(gguf.GGMLQuantizationType, gtype)
    data = gguf.quants.quantize(w32.numpy(), qtype)
    back = torch.from_numpy(gguf.quants.dequantize(data, qtype).reshape(w32.shape))
    return data, float((back - w32).abs().max())


def _rope_rows(n_out: int, n_head: int) -> torch.Tensor:
    """Row order that turns transformers' half-split rotary layout into llama.cpp's interleaved one.

    Per head of ``hd`` rows, transformers rotates row ``j`` with ``j + hd/2``; llama.cpp rotates
    rows ``2j`` and ``2j+1``. So new row ``2j + t`` (t in {0, 1}) is old row ``t * hd/2 + j``.
    """
    hd = n_out // n_head
    j = torch.arange(hd // 2)
    per_head = torch.stack([j, j + hd // 2], dim=1).reshape(-1)  # (hd,) = [0, hd/2, 1, hd/2+1, ...]
    return (torch.arange(n_head)[:, None] * hd + per_head[None]).reshape(-1)

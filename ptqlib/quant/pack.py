"""int32 packing in the GPTQ ecosystem checkpoint layout (AutoGPTQ / GPTQModel "gptq" v1 format).

Layout, for ``W: (out, in)`` with codes ``q`` and ``b`` bits:

* ``qweight: int32 (in * b / 32, out)`` packs ``q.T`` along the *input* dim;
* ``qzeros: int32 (G, out * b / 32)`` packs the zero points along the *output* dim.

Within a packed dimension the values form one little-endian bit stream: value ``k`` of the
dim occupies bits ``[b*k, b*k + b)`` of the concatenation ``word0 | word1 << 32 | ...``.
For ``b`` in {2, 4, 8} that is ``32 / b`` whole values per word (value ``j`` of a word at
bit ``b*j``). For ``b = 3`` it is the GPTQ layout where 32 values fill 3 words and values
10 and 21 straddle a word boundary (AutoGPTQ's ``pack`` writes exactly this stream).

v1 zero offset: the "gptq" (v1) format stores ``zero - 1`` in ``qzeros`` and readers add 1
back (AutoGPTQ's kernels, GPTQModel's v1->v2 conversion, vLLM's ``gptq`` kernels). We store
``(zero - 1) mod 2^b`` and read back ``(stored + 1) mod 2^b``, which is exact for every zero in
``[0, 2^b - 1]``. Caveat: v1 readers add the 1 *without* the modulo, so a zero point of
exactly 0 (stored as ``2^b - 1``) is read by them as ``2^b``; ``count_v1_unsafe_zeros``
finds such groups. ``uniform.find_params`` never makes one (its zero points are >= 1); for codes
from elsewhere the checkpoint writer switches the file to the v2 layout (``checkpoint_format:
gptq_v2``, GPTQModel's: ``qzeros`` holds ``zero`` itself, ``pack_qzeros_v2``), which v1-only
readers refuse rather than misread.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .grid import check_bits

_MASK32 = 0xFFFFFFFF


def _chunk(bits: int) -> tuple[int, int]:
    """(values, words) per repeating chunk of the stream: 32 values in 3 words for 3 bits."""
    g = math.gcd(bits, 32)
    return 32 // g, bits // g


def _to_int32(x: Tensor) -> Tensor:
    """Reinterpret non-negative int64 < 2^32 as int32 (two's complement), like ``np.uint32 -> int32``."""
    x = x & _MASK32
    return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)


def pack_rows(values: Tensor, bits: int) -> Tensor:
    """Pack ``values: (n, m)`` (ints in ``[0, 2^b)``) along dim 0 -> int32 ``(n * b / 32, m)``."""
    check_bits(bits)
    n, m = values.shape
    per, words = _chunk(bits)
    if n % per != 0:
        raise ValueError(f"{bits}-bit packing needs the packed dim ({n}) to be a multiple of {per}")
    v = values.to(torch.int64).reshape(n // per, per, m)  # (chunks, per, m)
    if (v < 0).any() or (v >= 2**bits).any():
        raise ValueError(f"values out of range for {bits} bits")
    out = torch.zeros(n // per, words, m, dtype=torch.int64, device=values.device)
    for k in range(per):  # at most 32 positions; each op is over all chunks at once
        off = bits * k
        w, s = divmod(off, 32)
        out[:, w] |= (v[:, k] << s) & _MASK32
        if s + bits > 32:  # straddles into the next word (3-bit values 10 and 21)
            out[:, w + 1] |= v[:, k] >> (32 - s)
    return _to_int32(out.reshape(n // per * words, m))


def unpack_rows(packed: Tensor, bits: int) -> Tensor:
    """Inverse of ``pack_rows``: int32 ``(n * b / 32, m)`` -> int32 codes ``(n, m)``."""
    check_bits(bits)
    per, words = _chunk(bits)
    r, m = packed.shape
    mask = 2**bits - 1
    if words == 1:
        # 2/4/8 bits: whole values per word; an arithmetic shift is fine because we mask.
        shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)  # (per,)
        codes = (packed.unsqueeze(1) >> shifts.view(1, per, 1)).bitwise_and_(mask)  # (r, per, m)
        return codes.reshape(r * per, m)
    p = packed.to(torch.int64).reshape(r // words, words, m) & _MASK32  # logical bits
    codes = torch.empty(r // words, per, m, dtype=torch.int64, device=packed.device)
    for k in range(per):
        w, s = divmod(bits * k, 32)
        v = p[:, w] >> s
        if s + bits > 32:
            v = v | (p[:, w + 1] << (32 - s))
        codes[:, k] = v & mask
    return codes.reshape(r // words * per, m).to(torch.int32)


def pack_qweight(codes: Tensor, bits: int) -> Tensor:
    """codes ``(out, in)`` -> ``qweight`` int32 ``(in * b / 32, out)`` (packed along in)."""
    return pack_rows(codes.t(), bits)


def unpack_qweight(qweight: Tensor, bits: int) -> Tensor:
    """``qweight`` int32 ``(in * b / 32, out)`` -> codes int32 ``(in, out)`` (storage orientation)."""
    return unpack_rows(qweight, bits)


def pack_qzeros(zeros: Tensor, bits: int) -> Tensor:
    """Integer zero points ``(G, out)`` -> ``qzeros`` int32 ``(G, out * b / 32)``, v1: stores ``zero - 1``."""
    z = torch.round(zeros.float()).to(torch.int64)
    stored = (z - 1) & (2**bits - 1)  # v1 offset; zero 0 wraps to 2^b - 1 (see module docstring)
    return pack_rows(stored.t(), bits).t().contiguous()


def unpack_qzeros(qzeros: Tensor, bits: int) -> Tensor:
    """``qzeros`` int32 ``(G, out * b / 32)`` -> integer zero points int32 ``(G, out)`` (undoes the v1 ``-1``)."""
    stored = unpack_rows(qzeros.t(), bits).t()
    return (stored + 1) & (2**bits - 1)


def count_v1_unsafe_zeros(qzeros: Tensor, bits: int) -> int:
    """How many groups have zero point 0, which v1 readers (add 1, no modulo) misread as ``2^b``."""
    return int((unpack_qzeros(qzeros, bits) == 0).sum())


def pack_qzeros_v2(zeros: Tensor, bits: int) -> Tensor:
    """The v2 layout of ``pack_qzeros``: ``qzeros`` holds the zero points themselves, no offset."""
    z = torch.round(zeros.float()).to(torch.int64)
    return pack_rows(z.t(), bits).t().contiguous()


def unpack_qzeros_v2(qzeros: Tensor, bits: int) -> Tensor:
    """Inverse of ``pack_qzeros_v2``: ``(G, out * b / 32)`` -> zero points int32 ``(G, out)``."""
    return unpack_rows(qzeros.t(), bits).t()

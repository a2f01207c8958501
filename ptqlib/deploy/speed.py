"""Decode speed against the memory-bandwidth limit.

At batch 1 a decoder reads every weight once per generated token, so the fastest decode a
machine allows is ``copy bandwidth / weight bytes read per token``. ``bandwidth_ratio`` says how
far a measured decode is from that limit (1.0 = at the limit).
"""
from __future__ import annotations

import time

import numpy as np


def copy_bandwidth_gbs(mb: int = 256, repeats: int = 5) -> float:
    """The machine's memory copy bandwidth in GB/s (read + write bytes / time), best of ``repeats``.

    Arrays of ``mb`` MiB are far larger than any cache, so this is DRAM bandwidth as one
    process sees it.
    """
    a = np.ones(mb * 2**20 // 8, dtype=np.float64)
    b = np.empty_like(a)
    np.copyto(b, a)  # touch the pages first
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t0)
    return 2 * a.nbytes / best / 1e9


def weight_bytes_per_token(tensors, tied_embeddings: bool) -> int:
    """Bytes of weights one decode step reads: every tensor except the embedding table (one row
    is gathered), which counts once more as the output projection when the embeddings are tied.

    ``tensors``: (name, nbytes) pairs of a GGUF export (``ExportReport.tensors``).
    """
    total = 0
    for name, nbytes in tensors:
        if name == "token_embd.weight":
            total += nbytes if tied_embeddings else 0
        else:
            total += nbytes
    return total


def bandwidth_ratio(decode_tokens_per_s: float, bytes_per_token: int, bandwidth_gbs: float) -> float:
    """(bandwidth-limited tokens/s) / measured tokens/s: 1.0 means decode runs at the limit."""
    limit = bandwidth_gbs * 1e9 / bytes_per_token
    return limit / decode_tokens_per_s

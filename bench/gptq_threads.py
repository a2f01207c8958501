"""Does GPTQ pick the same codes with another torch thread count? One SmolLM2-sized layer.

    python bench/gptq_threads.py            # 576 -> 1536 (SmolLM2's up_proj), 4 bits, g64; seconds

Why it matters: a stage's id hashes its settings, not the machine, so a cached GPTQ stage (or one
kept from a committed report) made with another thread count is treated as the same stage. The
Hessian here is bit-identical across thread counts, but the Cholesky and the blocked error
updates are not, and a rounding flip feeds forward through GPTQ's error compensation. Prints the
number of codes that differ between 1 and 2 threads and between two 1-thread runs (must be 0).
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

from ptqlib.quant.gptq import GPTQ


def codes(threads: int, rows: int, cols: int, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    lin = nn.Linear(cols, rows, bias=False)
    x = torch.randn(32, 256, cols) @ torch.randn(cols, cols) * 0.1  # correlated inputs, as in a model
    g = GPTQ(lin)
    for batch in x:
        g.add_batch(batch)
    return g.H, g.quantize(bits=bits, group_size=group_size).codes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1536)
    ap.add_argument("--cols", type=int, default=576)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    a = ap.parse_args()
    args = (a.rows, a.cols, a.bits, a.group_size)
    (h1, c1), (h2, c2), (_, c1b) = codes(1, *args), codes(2, *args), codes(1, *args)
    print(f"layer {a.cols} -> {a.rows}, {a.bits} bits, g{a.group_size}, torch {torch.__version__}")
    print(f"H identical at 1 and 2 threads: {torch.equal(h1, h2)}")
    print(f"codes differing, 1 vs 2 threads: {(c1 != c2).sum().item()} of {c1.numel()}")
    print(f"codes differing, 1 vs 1 thread (repeat): {(c1 != c1b).sum().item()}")


if __name__ == "__main__":
    main()

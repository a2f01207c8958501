"""An L4Q (and a QAT-LoRA) training step with the quantizer compiled and eager, side by side in one process.

    python bench/quantizer_kernels.py [--study parameters/default.yaml] [--rounds 2] [--steps 3]

``quantizer_kernel: compiled`` runs the learnable quantizer's element-wise work as one compiled kernel in
forward and one in backward (``ptqlib.adapters.quantizer_kernels``: the same weights bit for bit,
``tests/adapters/test_quantizer_kernels.py``); ``eager`` runs PyTorch's ops one by one. Runs
``bench/stage_speed.py``'s training step (the study's model, its training batch, the ``auto`` precision, 4-bit
at the study's group size), alternating eager / compiled for ``--rounds`` rounds after one warm-up that
compiles, and prints the best seconds per step of each and their ratio (``l4q quantizer_kernel speed-up:
X.XXx``). Not a test: timings on shared machines are noisy; compare the columns of one run.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from stage_speed import cpu_name, study_shapes, train_speed  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--study", default="parameters/default.yaml")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per run (after one warm-up step)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--methods", nargs="+", default=["l4q", "qat_lora"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from ptqlib.adapters.quantizer_kernels import compiled
    from ptqlib.models import load_model

    model, tok = load_model(study_shapes(args.study).model)
    S = study_shapes(args.study, tok)
    compiled("compiled")  # the compile itself (once per process, ~20 s cold) stays out of the timed steps
    print(f"machine: {cpu_name()}, {args.threads} threads; torch {torch.__version__}; {args.study}: r{S.rank}, "
          f"4-bit g{S.group_size}, {S.train_batch} x {S.train_seq} tokens, precision auto")
    for method in args.methods:
        per_step: dict[str, list[float]] = {"eager": [], "compiled": []}
        for r in range(args.rounds):
            for kernel in per_step:
                tps = train_speed(model, tok, method, "auto", args.steps, S.train_batch, S.train_seq,
                                  S.train_labelled, group_size=S.group_size, rank=S.rank, alpha=S.alpha,
                                  quantizer_kernel=kernel)
                per_step[kernel].append(S.train_batch * S.train_seq / tps)
                print(f"  {method}, round {r + 1}, {kernel}: {per_step[kernel][-1]:.3f} s per step")
        eager, fused = min(per_step["eager"]), min(per_step["compiled"])
        print(f"{method} best s per step: eager {eager:.3f}, compiled {fused:.3f}")
        print(f"{method} quantizer_kernel speed-up: {eager / fused:.2f}x")


if __name__ == "__main__":
    main()

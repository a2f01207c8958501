"""A QLoRA step on a 4-bit QuantLinear base with ``base_cache`` on and off, side by side in one process.

    python bench/base_cache.py [--study parameters/default.yaml] [--rounds 2] [--steps 3]

The base de-quantizes every layer in each forward and again in backward unless ``base_cache`` keeps the
de-quantized weights across steps (``ptqlib.quant.qlinear.kept_dequantized``: the same adapter bit for bit,
``tests/stages/test_finetune.py``). Runs ``bench/stage_speed.py``'s QLoRA step (the study's model, RTN 4-bit at
its group size, its training batch, the ``auto`` precision), alternating off / on for ``--rounds`` rounds, and
prints the best seconds per step of each, their ratio (``base_cache speed-up: X.XXx``) and the memory the kept
weights cost. Not a test: timings on shared machines are noisy; compare the two columns of one run.
"""
from __future__ import annotations

import argparse
import copy
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
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from ptqlib.models import load_model
    from ptqlib.quant import rtn_quantize_model

    model, tok = load_model(study_shapes(args.study).model)
    S = study_shapes(args.study, tok)
    qbase = copy.deepcopy(model)
    rtn_quantize_model(qbase, bits=4, group_size=S.group_size, progress=False)
    del model
    print(f"machine: {cpu_name()}, {args.threads} threads; torch {torch.__version__}; {args.study}: QLoRA r{S.rank} "
          f"on RTN 4-bit g{S.group_size}, {S.train_batch} x {S.train_seq} tokens, precision auto")
    per_step: dict[str, list[float]] = {"off": [], "on": []}
    for r in range(args.rounds):
        for cache in (False, True):
            tps = train_speed(qbase, tok, "qlora", "auto", args.steps, S.train_batch, S.train_seq, S.train_labelled,
                              rank=S.rank, alpha=S.alpha, base_cache=cache)
            per_step["on" if cache else "off"].append(S.train_batch * S.train_seq / tps)
            print(f"  round {r + 1}, base_cache {'on' if cache else 'off'}: "
                  f"{per_step['on' if cache else 'off'][-1]:.3f} s per step")
    kept = sum(m.in_features * m.out_features for m in qbase.modules() if hasattr(m, "qweight"))
    off, on = min(per_step["off"]), min(per_step["on"])
    print(f"best s per step: off {off:.3f}, on {on:.3f}; kept weights {kept * 2 / 2**20:.0f} MiB in bf16")
    print(f"base_cache speed-up: {off / on:.2f}x")


if __name__ == "__main__":
    main()

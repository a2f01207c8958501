"""The labelled-rows loss against transformers' own path: training tokens/s, side by side.

    python bench/sft_loss.py [--steps 3] [--study parameters/default.yaml]

For the full-FT and QLoRA steps at the study's shapes (``bench/stage_speed.py``'s ``study_shapes``:
batch, mean padded length, share of labelled tokens), in fp32 and in the ``auto`` precision, it times
``finetune.train`` with ``labelled_loss=True`` (ptqlib's path, ``ptqlib.stages.sft_loss``) and ``False``
(the model's own loss over every position; accelerate's autocast, which casts the logits to fp32),
in the order A B B A in one process (the mean of the two runs each). In fp32 the two give the same
weights bit for bit; in bf16 ptqlib's path also runs the output head on the labelled rows only, the
same weights to rounding (``tests/stages/test_sft_loss.py``).
"""
from __future__ import annotations

import argparse
import copy
import os

import stage_speed as S
import torch

from ptqlib import precision as P
from ptqlib.models import load_model
from ptqlib.quant import rtn_quantize_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=3, help="timed steps per run (after one warm-up step)")
    ap.add_argument("--study", default="parameters/default.yaml")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model(S.study_shapes(args.study).model)
    sh = S.study_shapes(args.study, tok)
    qbase = copy.deepcopy(model)
    rtn_quantize_model(qbase, bits=4, group_size=sh.group_size, progress=False)
    print(f"machine: {S.cpu_name()}, {args.threads} threads; training {sh.train_batch} x {sh.train_seq} tokens, "
          f"{sh.train_labelled:.0%} labelled, {args.steps} timed steps")
    print(f"{'step':8s} {'precision':9s} {'transformers tok/s':>19s} {'labelled rows tok/s':>20s} {'ratio':>6s}")
    for method, base in (("full", model), ("qlora", qbase)):
        for prec in dict.fromkeys(("fp32", P.resolve("auto"))):
            runs = {False: [], True: []}
            for labelled in (False, True, True, False):  # ABBA: neither path always runs first
                runs[labelled].append(S.train_speed(base, tok, method, prec, args.steps, sh.train_batch, sh.train_seq,
                                                    sh.train_labelled, labelled_loss=labelled, rank=sh.rank,
                                                    alpha=sh.alpha))
            tps = {k: sum(v) / len(v) for k, v in runs.items()}
            print(f"{method:8s} {prec:9s} {tps[False]:19.0f} {tps[True]:20.0f} {tps[True] / tps[False]:5.2f}x",
                  flush=True)


if __name__ == "__main__":
    main()

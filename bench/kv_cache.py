"""KV cache: greedy generation with transformers' DynamicCache vs ptqlib's GrowingCache, side by side.

    python bench/kv_cache.py [--model smollm2-135m] [--prompts 32] [--new 56] [--precision auto]

The study's evaluate shapes by default (32 task prompts, left-padded, 56 new tokens). Prints whether the
two give the same tokens and the best of ``--repeats`` alternating runs of each. Not a test: timings on
shared machines are noisy.
"""
from __future__ import annotations

import argparse
import time

import torch

from ptqlib.data import format_prompt, load_task
from ptqlib.models import load_model
from ptqlib.precision import cast_for_inference, resolve
from ptqlib.stages.kv_cache import GrowingCache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--new", type=int, default=56)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    model, tok = load_model(args.model)
    cast_for_inference(model, args.precision)
    tok.padding_side = "left"
    prompts = [format_prompt(tok, e.prompt) for e in load_task("meetings-hard", "test", args.prompts)]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)

    def run(growing: bool) -> tuple[torch.Tensor, float]:
        kw = {"cache": GrowingCache(model.config)} if growing else {}
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False,
                                 pad_token_id=tok.pad_token_id, **kw)
        return out, time.perf_counter() - t0

    run(False)  # warm-up
    secs: dict[bool, list[float]] = {False: [], True: []}
    outs = {}
    for _ in range(args.repeats):
        for growing in (False, True):
            outs[growing], t = run(growing)
            secs[growing].append(t)
    print(f"{args.model}, {resolve(args.precision)}, {args.prompts} prompts x {args.new} new tokens, "
          f"{torch.get_num_threads()} threads")
    print(f"same tokens: {torch.equal(outs[False], outs[True])}")
    print(f"DynamicCache s: {[round(s, 2) for s in secs[False]]}  GrowingCache s: {[round(s, 2) for s in secs[True]]}  "
          f"speed-up: {min(secs[False]) / min(secs[True]):.3f}x")


if __name__ == "__main__":
    main()

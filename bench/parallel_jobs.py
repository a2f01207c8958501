"""Two stages at once on one thread each, or one after the other on all threads: which finishes sooner?

    python bench/parallel_jobs.py [--quick] [--model smollm2-135m] [--only generation ...]

``ptqlib run --jobs J --threads T`` splits the CPU's threads between stages running at once. On a
small CPU this is a real choice: a 135M-parameter model's matmuls at a batch of a few rows do not
keep two cores busy (generation's decode steps read the weights for 8-32 rows; a QLoRA step is
many small ops), so two stages side by side on one thread each may finish sooner than the same two
one after the other on two threads. For each stage kind of ``bench/stage_speed.py`` (its code path,
at ``auto`` precision) this runs the same work twice

- serially: one process, ``--threads`` threads (all cores), the two runs one after the other;
- in parallel: two processes at once, ``--threads // 2`` threads each;

and prints the wall time of each and their ratio (serial / parallel: above 1, parallel jobs finish
the same work sooner). Every run loads its own model first (a stage does); the clock starts when
both runs have loaded it (a barrier) and covers the stage kind's whole function (its set-up, such
as Trainer's, included), so the figures compare the work, not the imports.
"""
from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def _work(kind: str, model_name: str, threads: int, quick: bool, start, out) -> None:
    """One run of ``kind`` in this process, after the barrier ``start``; puts its wall seconds on ``out``."""
    import torch

    torch.set_num_threads(threads)
    import stage_speed as S

    from ptqlib import precision as P
    from ptqlib.models import load_model
    from ptqlib.quant import rtn_quantize_model

    model, tok = load_model(model_name)
    if kind == "QLoRA step":
        rtn_quantize_model(model, bits=4, group_size=64, progress=False)
    auto = P.resolve("auto")
    steps, batch, seq = (2, 2, 128) if quick else (4, 4, 256)
    fns = {
        "full FT step": lambda: S.train_speed(model, tok, "full", auto, steps, batch, seq),
        "QLoRA step": lambda: S.train_speed(model, tok, "qlora", auto, steps, batch, seq),
        "GPTQ layer": lambda: S.gptq_layer_speed(model, auto, 4 if quick else 16, 256, len(tok)),
        "perplexity windows": lambda: S.ppl_speed(model, auto, 4 if quick else 16, 256, len(tok)),
        "generation": lambda: S.gen_speed(model, tok, auto, 8 if quick else 32, 24 if quick else 56),
    }
    start.wait()  # parallel runs start together, each with its model loaded
    t0 = time.perf_counter()
    fns[kind]()
    out.put(time.perf_counter() - t0)


def run(kind: str, model: str, jobs: int, threads: int, quick: bool) -> float:
    """Wall seconds of the timed parts of two runs of ``kind``: ``jobs`` at once (1: one after the other)."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    if jobs == 1:
        total = 0.0
        for _ in range(2):
            alone = ctx.Barrier(1)  # held here until the child has it
            p = ctx.Process(target=_work, args=(kind, model, threads, quick, alone, out))
            p.start()
            total += out.get()
            p.join()
        return total
    start = ctx.Barrier(jobs)
    procs = [ctx.Process(target=_work, args=(kind, model, threads, quick, start, out)) for _ in range(jobs)]
    for p in procs:
        p.start()
    walls = [out.get() for _ in procs]
    for p in procs:
        p.join()
    return max(walls)  # both started together: the pair is done when the slower one is


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="all threads (the serial runs' count)")
    ap.add_argument("--only", nargs="*", help="stage kinds to run (default: all)")
    a = ap.parse_args()
    kinds = ["full FT step", "QLoRA step", "GPTQ layer", "perplexity windows", "generation"]
    if a.only:
        kinds = [k for k in kinds if any(o.lower() in k.lower() for o in a.only)]
    half = max(1, a.threads // 2)
    print(f"two runs of each stage kind: serially on {a.threads} threads vs two processes at once on {half} each")
    print(f"{'stage kind':22s} {'serial s':>9s} {'parallel s':>11s} {'serial / parallel':>18s}")
    ratios = []
    for kind in kinds:
        s = run(kind, a.model, 1, a.threads, a.quick)
        p = run(kind, a.model, 2, half, a.quick)
        ratios.append(s / p)
        print(f"{kind:22s} {s:9.1f} {p:11.1f} {s / p:17.2f}x", flush=True)
    print(f"parallel jobs: {math.exp(sum(map(math.log, ratios)) / len(ratios)):.2f}x the serial throughput (geometric mean)")


if __name__ == "__main__":
    main()

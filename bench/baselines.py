"""The PTQ methods side by side on one model: quantize time, weight error, perplexity and KL.

For each method (default: rtn, gptq, hqq, awq, autoround) the float model is quantized through
ptqlib's quantize stage (``ptqlib.stages.quantize``: the same code a study runs, the same pydoc
calibration windows for every method that calibrates), then scored on held-out pydoc windows at
seeded random places: perplexity, mean KL of the next-token distribution from the float model
and top-1 agreement (``evaluate.window_nll``). Weight error: ``||W - W_hat||_F / ||W||_F`` averaged
over the decoder linears (not for AWQ, whose weights are in its rescaled basis).

    .venv/bin/python bench/baselines.py --quick          # tiny random model, ~1 min
    .venv/bin/python bench/baselines.py                  # SmolLM2-135M 4-bit g64, ~25 min on 2 cores

Prints a markdown table and writes ``bench/results/baselines.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", nargs="+", default=["rtn", "gptq", "hqq", "awq", "autoround"])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--calib", type=int, default=32, help="calibration windows (x --seq-len tokens)")
    ap.add_argument("--windows", type=int, default=32, help="held-out perplexity windows (x --seq-len tokens)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--iters", type=int, default=50, help="AutoRound steps per block (50: its light recipe)")
    ap.add_argument("--quick", action="store_true", help="the tiny model, small settings (checks the script)")
    ap.add_argument("--out", default=str(ROOT / "bench/results/baselines.json"))
    a = ap.parse_args(argv)
    if a.quick:
        a.model, a.group_size, a.calib, a.windows, a.seq_len, a.iters = "tiny", 32, 4, 4, 64, 2

    import torch
    from stage_speed import cpu_name  # bench/ is on the path when run as a script

    from ptqlib import artifacts
    from ptqlib.models import load_tokenizer
    from ptqlib.stages import evaluate, quantize
    from ptqlib.study.params import QuantizeParams
    from ptqlib.text import held_out_windows

    torch.manual_seed(0)
    fp_model, tok, _ = artifacts.load(a.model, "cpu")
    fp_model.eval()
    windows, _ = held_out_windows(load_tokenizer(artifacts.float_model_dir(a.model)), "pydoc", a.seq_len, a.windows)
    rows = []
    with torch.no_grad():
        ref = evaluate.window_nll(fp_model, windows)
    rows.append({"method": "float", "seconds": 0.0, "weight_rel_err": 0.0,
                 "ppl": math.exp(sum(ref["nll"]) / sum(ref["tokens"])), "kl": 0.0, "top1_agree": 1.0})
    for method in a.methods:
        extra = {"iters": a.iters, "round_lr": 5e-3} if method == "autoround" else {}
        p = QuantizeParams(method=method, bits=a.bits, group_size=a.group_size, calib_samples=a.calib,
                           calib_seq_len=a.seq_len, calib_seed=0, **extra)
        t0 = time.perf_counter()
        model, _, stats = quantize.quantize(a.model, p, quantize.calibration_windows(a.model, p))
        seconds = time.perf_counter() - t0
        werr = quantize.weight_error(fp_model, model)
        with torch.no_grad():
            s = evaluate.window_nll(model, windows, reference=fp_model)
        n = sum(s["tokens"])
        rows.append({"method": method, "seconds": seconds,
                     "weight_rel_err": math.nan if stats.get("weights_rescaled") else sum(werr.values()) / len(werr),
                     "ppl": math.exp(sum(s["nll"]) / n), "kl": sum(s["kl"]) / n, "top1_agree": sum(s["top1"]) / n})
        print(f"{method}: {seconds:.1f} s, ppl {rows[-1]['ppl']:.3f}, KL {rows[-1]['kl']:.4f}", flush=True)
        del model
    settings = {"model": a.model, "bits": a.bits, "group_size": a.group_size, "calib": f"{a.calib} x {a.seq_len} pydoc",
                "held_out": f"{a.windows} x {a.seq_len} pydoc (random)", "autoround_iters": a.iters,
                "cpu": cpu_name(), "threads": torch.get_num_threads(),
                "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    print(f"\n{settings}\n")
    print("| method | quantize s | weight rel. err | ppl | KL (nats/token) | top-1 agree |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        werr = "n/a (rescaled)" if math.isnan(r["weight_rel_err"]) else f"{r['weight_rel_err']:.4f}"
        print(f"| {r['method']} | {r['seconds']:.1f} | {werr} | {r['ppl']:.3f} | {r['kl']:.4f} | {r['top1_agree']:.3f} |")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"settings": settings, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

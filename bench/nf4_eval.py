"""NF4 evaluation: bitsandbytes' own forward against the weight de-quantized once, side by side.

    python bench/nf4_eval.py [--precision bf16|fp32] [--windows 8] [--prompts 32] [--new 56]

Quantizes SmolLM2-135M to NF4 (bitsandbytes, block 64, double quantization: the study's setting), then
times, at the given precision (bf16 unless told) and in the order A B B A, perplexity windows of 256
pydoc tokens and one batch of greedy
generation of the task's test prompts with (A) bitsandbytes' forward (on a CPU with AVX512-BF16 its fused
``gemv_4bit`` kernel at every call) and (B) ``ptqlib.methods.bnb.dense_inference`` (what the evaluate
stage does). Prints seconds per path and the ratio, and how far the two paths' perplexities are apart.
``--precision fp32``: (A) is bitsandbytes' fp32 path (de-quantize at every call, then ``linear``; kept
off its fused kernel, which computes in bf16 on a CPU with AVX512-BF16), and the last line says
whether the two paths' NLLs and generated tokens are equal bit for bit.
Not a test: timings on shared machines are noisy.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import tempfile
import time

import torch

from ptqlib import artifacts, precision
from ptqlib.data import load_task
from ptqlib.methods import bnb, lora
from ptqlib.stages import quantize as ptq
from ptqlib.stages.evaluate import generate, window_nll
from ptqlib.study.params import QuantizeParams
from ptqlib.text import held_out_windows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--windows", type=int, default=8, help="perplexity windows of 256 tokens")
    ap.add_argument("--prompts", type=int, default=32, help="test prompts, generated as one batch")
    ap.add_argument("--new", type=int, default=56, help="new tokens per prompt")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help="the evaluate stage's precision")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.precision == "bf16" and precision.resolve("auto") != "bf16" and not precision.forced():
        ap.error(f"this machine has no native bf16; set {precision.FORCE_ENV}=1 to measure emulated bf16")
    p = QuantizeParams(method="nf4").__dict__
    with tempfile.TemporaryDirectory() as tmp:
        model, tok, _ = ptq.quantize("smollm2-135m", p)
        ptq.save(model, tok, p, f"{tmp}/nf4", "smollm2-135m")
        loaded, tok, _ = artifacts.load(f"{tmp}/nf4", "cpu")
    windows, _ = held_out_windows(tok, "pydoc", 256, a.windows, "random")
    prompts = [e.prompt for e in load_task("meetings-hard", "test", a.prompts)]

    def prepared(dense: bool):
        m = precision.cast_for_inference(copy.deepcopy(loaded), a.precision)  # as the evaluate stage
        if dense:
            bnb.dense_inference(m, precision.dtype(a.precision))
        elif a.precision == "fp32":
            lora.keep_bnb_layout(m)  # bitsandbytes' fp32 arithmetic on every CPU, not its bf16 kernel
        return m

    times = {False: [], True: []}
    ppl, nll, texts = {}, {}, {}
    for dense in (False, True, True, False):
        m = prepared(dense)
        t0 = time.perf_counter()
        w = window_nll(m, windows)
        t1 = time.perf_counter()
        texts[dense], n_new, gen_s = generate(m, tok, prompts, a.new, len(prompts))
        times[dense].append((t1 - t0, gen_s))
        nll[dense], ppl[dense] = w["nll"], math.exp(sum(w["nll"]) / sum(w["tokens"]))
    mean = {k: [sum(x) / len(v) for x in zip(*v)] for k, v in times.items()}
    print(f"SmolLM2-135M NF4 at {a.precision}, {a.threads} threads: {a.windows} x 256-token perplexity windows, "
          f"{a.prompts} prompts x {a.new} new tokens (mean of 2 runs each, A B B A)")
    print(f"{'path':28s} {'perplexity s':>13s} {'generation s':>13s} {'ppl':>8s}")
    for k, name in ((False, "bitsandbytes' forward"), (True, "de-quantized once (dense)")):
        print(f"{name:28s} {mean[k][0]:13.2f} {mean[k][1]:13.2f} {ppl[k]:8.3f}")
    print(f"dense faster: perplexity {mean[False][0] / mean[True][0]:.2f}x, generation "
          f"{mean[False][1] / mean[True][1]:.2f}x; perplexities differ by {abs(ppl[True] / ppl[False] - 1):.2%}")
    if a.precision == "fp32":
        print(f"bit for bit: NLLs {'equal' if nll[True] == nll[False] else 'DIFFER'}, generated texts "
              f"{'equal' if texts[True] == texts[False] else 'DIFFER'}")


if __name__ == "__main__":
    main()

"""Stage speed: tokens/s of each stage kind in fp32 and in the ``auto`` precision, side by side.

    python bench/stage_speed.py [--quick] [--study parameters/default.yaml] [--threads N]

For each stage kind (full-FT step, QLoRA step on a 4-bit QuantLinear base, L4Q step, one GPTQ
decoder layer, evaluation: perplexity windows and batched greedy generation) it runs the library's
own code path (``finetune.train`` through transformers Trainer, ``gptq_quantize_model``,
``evaluate.window_nll`` / ``evaluate.generate``) once at ``precision: fp32`` (the code path every
stage took before the precision setting) and once at ``auto`` (``ptqlib.precision``: bf16 where
this machine computes it natively), in one process, alternating, so both see the same machine.
Each figure is also given as a share of the roofline: this machine's measured matmul FLOP/s at that
precision (large square-ish GEMMs, best of several), with the stage's FLOPs counted as

- training: 6 N T (full FT: forward 2 N T, input and weight gradients 4 N T), 4 N T for adapters on
  a frozen base (no weight gradient of the base), N = parameters in matmuls (lm_head included);
- GPTQ layer: the calibration forwards through the layer (one per true-sequential group and one
  for the next layer's inputs, 2 N_layer T each) plus the Hessians (2 in^2 T per group);
- perplexity and generation: 2 N T (attention's own FLOPs left out: at 256 tokens they are < 10%).

Every stage kind runs at the shapes the study runs it (``--study``, the default study unless given):
its model; the training batch: ``finetune.batch_size`` rows of the study's mean padded batch length
(from its task's training examples), as large a share of the tokens labelled as there; the GPTQ
calibration (``calib_samples`` x ``calib_seq_len`` tokens); the perplexity windows (``ppl_samples`` x
``ppl_seq_len``); the generation batch (``batch_size`` of the task's test prompts, ``max_new_tokens``
new). Per-step costs (the optimizer, GPTQ's column loop, a decode step's Python) weigh differently at
other shapes, so a benchmark at smaller ones would not say how fast the study runs. ``--quick`` only
repeats less: 3 timed training steps instead of 6, GPTQ on 2 decoder layers instead of 4.

The last column is the time of one unit of each kind at ``auto``: seconds per training step, per GPTQ
layer, per perplexity window, per generated example (its batch's wall time over its prompts);
``bench/compare_commits.py`` compares these between two commits of the library.
The last line is ``speed-up: X.XXx``: the geometric mean over the stage kinds of auto / fp32.
Not a test: timings on shared machines are noisy; compare the two columns, not runs.

``--profile`` runs each stage kind once more at ``auto`` under ``torch.profiler`` (the timed part
only) and prints where its wall time goes: matmuls, attention, the optimizer step, other ATen ops
(elementwise, casts, copies, reductions; the largest named) and the Python between ops (wall time
that no ATen op accounts for). The profiler adds a few microseconds per op, so the Python share of
op-heavy loops (generation, GPTQ's columns) is an upper bound. It then measures generation's decode
steps on their own (the batch generated with 1 new token, then with all of them) at both precisions,
against the roofline that bounds them: a decode step reads every weight and the whole KV cache to
produce one token per prompt, so its ceiling is this machine's memory bandwidth (the best rate of
copying a 256 MiB tensor, bytes read + written), not its matmul rate.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import io
import math
import os
import platform
import time

import torch

from ptqlib import precision as P


class Region:
    """The timed part of a stage kind; under ``--profile`` also the part that is profiled."""

    def __init__(self):
        self.prof: torch.profiler.profile | None = None
        self.wall = 0.0
        self._t0 = 0.0

    def start(self) -> None:
        if self.prof is not None:
            self.prof.start()
        self._t0 = time.perf_counter()

    def stop(self) -> None:
        self.wall += time.perf_counter() - self._t0
        if self.prof is not None:
            self.prof.stop()

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()


REGION = Region()  # replaced by a profiling one under --profile

# ATen ops by what they are (self time; composite ops such as aten::linear have ~0 self time)
MATMUL = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm", "aten::_addmm_activation",
          "mkldnn", "aten::dot", "aten::mv", "aten::addmv", "aten::addr")
ATTENTION = ("scaled_dot_product", "flash_attention")


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def matmul_flops(dtype: torch.dtype, device: str, seconds: float = 1.5) -> float:
    """Best FLOP/s of (m, k) @ (k, n) GEMMs the size of a batch of SmolLM2 activations."""
    best = 0.0
    for m, k, n in ((1024, 576, 1536), (1024, 1536, 576), (2048, 1024, 1024)):
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        a @ b  # warm-up
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 3:
            a @ b
            reps += 1
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * m * k * n * reps / (time.perf_counter() - t0))
    return best


def copy_bandwidth(device: str, seconds: float = 1.0) -> float:
    """Best bytes/s (read + written) of copying a 256 MiB float32 tensor: the memory roofline."""
    a = torch.ones(64 * 2**20, device=device)
    b = torch.empty_like(a)
    best = 0.0
    for _ in range(3):
        b.copy_(a)  # warm-up: b's pages faulted in
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 3:
            b.copy_(a)
            reps += 1
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * a.numel() * a.element_size() * reps / (time.perf_counter() - t0))
    return best


def decode_steps(model, tok, prec: str, task: str, n: int, new: int) -> dict[str, float]:
    """Seconds per decode step of greedy generation of ``n`` test prompts of ``task`` at ``prec`` (the
    batch with ``new`` new tokens minus the batch with 1: the prefill cancels), and the bytes a step
    must read at least: every matmul weight (lm_head included) once, and the KV cache at its mean
    length over the steps (the left-padded prompt length plus half the new tokens)."""
    from ptqlib.data import format_prompt, load_task
    from ptqlib.stages.evaluate import generate

    m = P.cast_for_inference(copy.deepcopy(model), prec)
    prompts = [e.prompt for e in load_task(task, "test", n)]
    longest = max(len(tok(format_prompt(tok, p), add_special_tokens=False)["input_ids"]) for p in prompts)
    secs = {}
    for k in (1, new, 1, new):  # best of two each: the prefill must cancel
        _, _, s = generate(m, tok, prompts, max_new_tokens=k, batch_size=n)
        secs[k] = min(secs.get(k, math.inf), s)
    cfg = m.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    width = next(p for p in m.parameters() if p.is_floating_point()).element_size()
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * width * n * (longest + new / 2)
    return {"step_s": (secs[new] - secs[1]) / (new - 1), "weights": matmul_params(m) * width, "kv": kv}


def matmul_params(model) -> int:
    """Parameters that take part in matmuls: every linear (lm_head too; the embedding lookup not)."""
    n = 0
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear):
            n += mod.weight.numel()
        elif type(mod).__name__ == "QuantLinear":
            n += mod.in_features * mod.out_features
    return n


class _StepTimer:
    """A Trainer callback: wall time of each optimizer step (the first one is a warm-up)."""

    def __init__(self):
        from transformers import TrainerCallback

        outer = self

        class CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **k):
                if state.global_step == 1:  # after the warm-up step: the timed (and profiled) steps
                    REGION.start()
                outer.t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **k):
                outer.steps.append(time.perf_counter() - outer.t0)
                if state.global_step == state.max_steps and state.max_steps > 1:
                    REGION.stop()

        self.cb, self.steps, self.t0 = CB(), [], 0.0


def train_speed(model, tok, method: str, prec: str, steps: int, batch: int, seq: int, labelled: float,
                labelled_loss: bool = True, **kw) -> float:
    """Tokens/s of ``steps`` optimizer steps (after one warm-up step) of ``method`` at ``prec``;
    the last ``labelled`` share of each row's tokens carry labels (SFT: the answer after the prompt)."""
    from ptqlib.stages import finetune
    from ptqlib.study.params import FinetuneParams

    kw = {"rank": 16, "alpha": 32, **kw}
    p = FinetuneParams(method=method, steps=steps + 1, batch_size=batch, max_length=seq, lr=1e-5,
                       precision=prec, **kw)
    m = finetune.prepare(copy.deepcopy(model), method, p)
    # fixed-length random tokens: every step the same work
    g = torch.Generator().manual_seed(0)
    feats, prompt = [], seq - max(1, round(labelled * seq))
    for _ in range(batch * (steps + 1)):
        ids = torch.randint(10, len(tok) - 10, (seq,), generator=g).tolist()
        feats.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    timer = _StepTimer()
    with contextlib.redirect_stdout(io.StringIO()):  # Trainer prints each step's log when tqdm is off
        finetune.train(m, tok, feats, p, seed=0, callbacks=[timer.cb], labelled_loss=labelled_loss)
    timed = timer.steps[1:]
    return batch * seq * len(timed) / sum(timed)


def gptq_layer_speed(model, prec: str, n_windows: int, seq: int, vocab: int, group_size: int,
                     n_layers: int) -> tuple[float, float]:
    """(tokens/s, FLOP/s) of GPTQ on the first ``n_layers`` decoder layers (per layer), no diagnostics."""
    from ptqlib.quant.gptq_model import gptq_quantize_model
    from ptqlib.quant.layers import get_decoder_layers

    m = copy.deepcopy(model)
    name, layers = get_decoder_layers(m)
    del layers[n_layers:]
    m.config.num_hidden_layers = n_layers
    g = torch.Generator().manual_seed(0)
    calib = [torch.randint(10, vocab - 10, (1, seq), generator=g) for _ in range(n_windows)]
    with REGION:
        stats = gptq_quantize_model(m, calib, bits=4, group_size=group_size, progress=False, diagnostics=False,
                                    precision=P.resolve(prec))
    secs = stats["time_s"] / n_layers
    tokens = n_windows * seq
    n_layer = sum(p.numel() for p in get_decoder_layers(model)[1][0].parameters() if p.dim() == 2)
    cfg = model.config
    # one forward per true-sequential group + one for the next layer; one Hessian per group's input
    ins = [cfg.hidden_size, cfg.hidden_size, cfg.hidden_size, cfg.intermediate_size]  # qkv, o, up/gate, down
    flops = (5 * 2 * n_layer + sum(2 * i * i for i in ins)) * tokens
    return tokens / secs, flops / secs


def ppl_speed(model, prec: str, n: int, seq: int, vocab: int) -> float:
    from ptqlib.stages.evaluate import window_nll

    m = P.cast_for_inference(copy.deepcopy(model), prec)
    g = torch.Generator().manual_seed(0)
    w = torch.randint(10, vocab - 10, (n, seq), generator=g)
    window_nll(m, w[:2])  # warm-up
    t0 = time.perf_counter()
    with REGION:
        window_nll(m, w)
    return n * seq / (time.perf_counter() - t0)


def gen_speed(model, tok, prec: str, task: str, n: int, new: int) -> float:
    """(prompt + generated) tokens/s of one batch of greedy generation of the task's test prompts."""
    from ptqlib.data import format_prompt, load_task
    from ptqlib.stages.evaluate import generate

    m = P.cast_for_inference(copy.deepcopy(model), prec)
    prompts = [e.prompt for e in load_task(task, "test", n)]
    prompt_tokens = sum(len(tok(format_prompt(tok, p), add_special_tokens=False)["input_ids"]) for p in prompts)
    t0 = time.perf_counter()
    with REGION:  # generate's own warm-up (2 tokens of one prompt) is inside
        _, n_new, _ = generate(m, tok, prompts, max_new_tokens=new, batch_size=n)
    PER_UNIT["generation"] = (prompt_tokens + n_new) / n  # tokens per example
    return (prompt_tokens + n_new) / (time.perf_counter() - t0)


PER_UNIT: dict[str, float] = {}  # stage kind -> tokens per unit (a training step, a layer, a window, an example)


@dataclasses.dataclass(frozen=True)
class Shapes:
    """The shapes a study runs its stage kinds at (see the module docstring)."""

    model: str
    task: str
    train_batch: int  # finetune.batch_size
    train_seq: int  # the mean padded length of its training batches
    train_labelled: float  # the share of their tokens that carry a label (the answers)
    rank: int
    alpha: int
    group_size: int
    calib: tuple[int, int]  # (windows, tokens each)
    ppl: tuple[int, int]  # (windows, tokens each)
    gen: tuple[int, int]  # (prompts in the batch, new tokens)


def study_shapes(path: str, tok=None) -> Shapes:
    """Read ``path``'s model, task and stage defaults; ``tok`` measures the training batches' length."""
    import statistics

    import yaml

    from ptqlib.data import load_task, sft_features

    raw = yaml.safe_load(open(path))
    d = raw.get("defaults", {})
    ft, qz, ev = d.get("finetune", {}), d.get("quantize", {}), d.get("evaluate", {})
    model = raw.get("model", "smollm2-135m")
    model = model[0] if isinstance(model, list) else model
    task = raw.get("task", "meetings")
    batch = int(ft.get("batch_size", 4))
    seq, labelled = 256, 0.5
    if tok is not None:  # the study's batches, in order, each padded to its longest example
        feats = sft_features(tok, load_task(task, "train", int(ft.get("train_samples", 240))),
                             int(ft.get("max_length", 512)))
        lengths = [len(f["input_ids"]) for f in feats]
        seq = round(statistics.mean(max(lengths[i:i + batch]) for i in range(0, len(lengths), batch)))
        labelled = sum(sum(t != -100 for t in f["labels"]) for f in feats) / (seq * len(feats))
    return Shapes(model, task, batch, seq, labelled, int(ft.get("rank", 16)), int(ft.get("alpha", 32)),
                  int(qz.get("group_size", 64)),
                  (int(qz.get("calib_samples", 32)), int(qz.get("calib_seq_len", 256))),
                  (int(ev.get("ppl_samples", 32)), int(ev.get("ppl_seq_len", 256))),
                  (int(ev.get("batch_size", 32)), int(ev.get("max_new_tokens", 56))))


def breakdown(prof: torch.profiler.profile, wall: float) -> str:
    """Where ``wall`` seconds went, from the profiler's ATen ops' self times (microseconds)."""
    cats = {"matmul": 0.0, "attention": 0.0, "other ATen": 0.0}
    other: dict[str, float] = {}
    optim = 0.0
    for e in prof.key_averages():
        if e.key.startswith("Optimizer.step#"):
            optim += e.cpu_time_total  # inclusive: the optimizer's own ops are inside
            continue
        t = e.self_cpu_time_total
        if any(k in e.key for k in MATMUL):
            cats["matmul"] += t
        elif any(k in e.key for k in ATTENTION):
            cats["attention"] += t
        else:
            cats["other ATen"] += t
            other[e.key] = t
    wall_us = wall * 1e6
    python = max(0.0, wall_us - sum(cats.values()))
    top = sorted(other.items(), key=lambda kv: -kv[1])[:4]
    parts = [f"{k} {v / wall_us:.0%}" for k, v in cats.items()] + [f"Python between ops {python / wall_us:.0%}"]
    if optim:
        parts.append(f"(optimizer step {optim / wall_us:.0%}, inside the above)")
    return ", ".join(parts) + "; largest other: " + ", ".join(f"{k} {v / wall_us:.0%}" for k, v in top)


def profile_kinds(kinds: dict, prec: str) -> None:
    """Each stage kind once more at ``prec`` under torch.profiler: where its time goes."""
    global REGION
    print(f"\nwhere the time goes at {prec} (torch.profiler, the timed part; shares of its wall time):")
    for name, (fn, _) in kinds.items():
        REGION = Region()
        REGION.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        fn(prec)
        print(f"  {name}: {breakdown(REGION.prof, REGION.wall)}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (under 5 minutes on 2 cores)")
    ap.add_argument("--study", default="parameters/default.yaml",
                    help="the study file whose model and shapes the stage kinds run at")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--only", nargs="*", help="stage kinds to run (default: all)")
    ap.add_argument("--profile", action="store_true", help="then profile each stage kind at auto precision")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from ptqlib.models import load_model
    from ptqlib.quant import rtn_quantize_model

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    auto = P.resolve("auto")
    native, looked = P.bf16_native()
    print(f"machine: {cpu_name()}, {args.threads} threads, device {dev}; bf16 native: {native} ({looked})")
    if not os.path.isfile(args.study):
        ap.error(f"--study {args.study}: no such study file (for example parameters/default.yaml)")
    model_name = study_shapes(args.study).model
    print(f"auto precision here: {auto}; torch {torch.__version__}; model {model_name}")
    model, tok = load_model(model_name)
    S = study_shapes(args.study, tok)
    vocab = len(tok)
    N = matmul_params(model)
    q = args.quick
    steps, n_layers = (3, 2) if q else (6, 4)
    print(f"shapes of {args.study}: training {S.train_batch} x {S.train_seq} tokens, {S.train_labelled:.0%} "
          f"labelled ({steps} timed steps), "
          f"GPTQ {S.calib[0]} x {S.calib[1]} (g{S.group_size}, {n_layers} layers), perplexity {S.ppl[0]} x "
          f"{S.ppl[1]}, generation {S.gen[0]} prompts x {S.gen[1]} new tokens")
    roof = {p: matmul_flops(P.dtype(p), dev, 1.5 if q else 4) for p in dict.fromkeys(("fp32", auto))}
    for p, f in roof.items():
        print(f"roofline (matmul) {p}: {f / 1e9:.0f} GFLOP/s")
    qbase = copy.deepcopy(model)
    rtn_quantize_model(qbase, bits=4, group_size=S.group_size, progress=False)
    b, L, ad = S.train_batch, S.train_seq, {"rank": S.rank, "alpha": S.alpha, "labelled": S.train_labelled}

    kinds = {
        "full FT step": (lambda p: train_speed(model, tok, "full", p, steps, b, L, S.train_labelled), 6 * N),
        "QLoRA step (4-bit base)": (lambda p: train_speed(qbase, tok, "qlora", p, steps, b, L, **ad), 4 * N),
        "L4Q step": (lambda p: train_speed(model, tok, "l4q", p, steps, b, L, group_size=S.group_size, **ad),
                     4 * N),
        "GPTQ layer": (lambda p: gptq_layer_speed(model, p, *S.calib, vocab, S.group_size, n_layers), None),
        "perplexity windows": (lambda p: ppl_speed(model, p, *S.ppl, vocab), 2 * N),
        "generation": (lambda p: gen_speed(model, tok, p, S.task, *S.gen), 2 * N),
    }
    if args.only:
        kinds = {k: v for k, v in kinds.items() if any(o.lower() in k.lower() for o in args.only)}
    PER_UNIT.update({"full FT step": b * L, "QLoRA step (4-bit base)": b * L, "L4Q step": b * L,
                     "GPTQ layer": S.calib[0] * S.calib[1], "perplexity windows": S.ppl[1]})
    unit = {"GPTQ layer": "s/layer", "perplexity windows": "s/window", "generation": "s/example"}
    print(f"\n{'stage kind':26s} {'fp32 tok/s':>11s} {'roof':>5s}  {auto + ' tok/s':>11s} {'roof':>5s}  {'ratio':>6s}"
          f"  {auto + ' per unit':>20s}")
    ratios = []
    for name, (fn, flops_per_tok) in kinds.items():
        row = {}
        for p in ("fp32", auto):
            r = fn(p)
            tps, fl = (r if isinstance(r, tuple) else (r, r * flops_per_tok))
            row[p] = (tps, fl / roof[p])
        ratio = row[auto][0] / row["fp32"][0]
        ratios.append(ratio)
        per = PER_UNIT[name] / row[auto][0]  # seconds per step / layer / window / example
        print(f"{name:26s} {row['fp32'][0]:11.0f} {row['fp32'][1]:5.0%}  {row[auto][0]:11.0f} {row[auto][1]:5.0%}  "
              f"{ratio:5.2f}x  {per:10.3f} {unit.get(name, 's/step'):>9s}", flush=True)
    speedup = math.exp(sum(map(math.log, ratios)) / len(ratios))
    if args.profile:
        profile_kinds(kinds, auto)
        if "generation" in kinds and S.gen[1] > 1:  # decode steps: at least 2 new tokens
            bw = copy_bandwidth(dev)
            print(f"\ngeneration's decode steps against the memory roofline (copy bandwidth {bw / 1e9:.1f} GB/s; "
                  f"batch {S.gen[0]}, {S.gen[1]} new tokens):")
            for p in dict.fromkeys(("fp32", auto)):
                d = decode_steps(model, tok, p, S.task, *S.gen)
                read = d["weights"] + d["kv"]
                print(f"  {p}: {d['step_s'] * 1e3:.1f} ms per step, reads >= {read / 2**20:.0f} MiB "
                      f"(weights {d['weights'] / 2**20:.0f}, KV cache {d['kv'] / 2**20:.0f}): "
                      f"{read / d['step_s'] / 1e9:.1f} GB/s, {read / d['step_s'] / bw:.0%} of the bandwidth", flush=True)
    print(f"speed-up: {speedup:.2f}x")


if __name__ == "__main__":
    main()

"""B's speed over A's: the library at two commits, measured side by side with one environment.

    python bench/compare_commits.py A B [--quick] [--study parameters/default.yaml] [--rounds 2]
                                        [--generation study|prefix|generate]

Checks out ``ptqlib`` at commits A and B (``git worktree``, removed at the end) and runs the same
measurements for each in a fresh process whose ``import ptqlib`` is that commit's (this file's
``--probe`` mode, with ``PYTHONPATH`` the worktree), alternating A, B, A, B, ... for ``--rounds``
rounds and keeping each figure's best. The measurements are ``bench/stage_speed.py``'s own functions at
the shapes B's study runs (its model, generation batch and new tokens, perplexity windows, training batch,
GPTQ calibration), at ``precision: auto``, each as a time per unit:

- ``generation``: seconds per task example (an evaluate stage's test prompts, ``task_samples`` of them, in
  the study's ``batch_size``, greedy), by the study's ``generation`` path (``--generation`` picks one; a
  commit with one path runs it);
- ``ppl`` / ``kl``: seconds per perplexity window without / with the 16-bit reference (KL, top-1);
  where the commit caches the reference's hidden states (``ptqlib.stages.reference``) ``kl`` is a stage
  that finds the cache written (every KL stage after the first of its reference) and ``kl_cold`` the
  first;
- ``full`` / ``qlora`` / ``l4q``: seconds per optimizer step; ``gptq``: seconds per decoder layer.

The study's stage mix (B's study planned by this checkout's library, each selection's test pipelines
counted at its first candidate: a stage's cost does not depend on which value is chosen) weighs them
into an estimated stage time: every evaluate stage's examples and windows
(a KL stage per reference cold, the rest warm), every training stage's steps (methods other than full,
qlora and l4q at full FT's rate), every GPTQ stage's layers. The output ends with

    generation: X.XXx          B's examples per second over A's
    perplexity: X.XXx          the study's perplexity passes, weighed by its mix
    training: X.XXx            the geometric mean of the training kinds
    study stage time: X.XXx    the estimated stage time of the study, A's over B's

``--quick`` repeats less (2 timed training steps, 1 GPTQ layer, 8 perplexity windows: the per-window
time at the study's batch) and runs one round unless ``--rounds`` says otherwise. Timings on shared
machines are noisy: the figures are ratios of runs side by side, never of runs on other days.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAINING = ("full", "qlora", "l4q")
PROBE = "PROBE "


def evaluate_default(study: str, key: str, default):
    """``defaults.evaluate.<key>`` of ``study`` (``task_samples``: the test examples a stage generates;
    ``generation``: its generation path), else ``default``."""
    import yaml

    raw = yaml.safe_load(Path(study).read_text()) or {}
    return ((raw.get("defaults") or {}).get("evaluate") or {}).get(key, default)


# ---------------------------------------------------------------------------------------------
# the probe: runs in a process whose ``ptqlib`` is one commit's
# ---------------------------------------------------------------------------------------------
def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def probe(study: str, quick: bool, generation: str) -> dict[str, float]:
    """Seconds per unit of each measured kind at ``study``'s shapes, with this process's ``ptqlib``
    (``generation``: the evaluate stage's path, where this commit has more than one)."""
    import copy
    import importlib.util
    import inspect

    import stage_speed as B
    import torch

    from ptqlib import precision as P
    from ptqlib.data import load_task
    from ptqlib.models import load_model
    from ptqlib.quant import rtn_quantize_model
    from ptqlib.stages.evaluate import generate, window_nll

    model, tok = load_model(B.study_shapes(study).model)
    S = B.study_shapes(study, tok)
    prec = P.resolve("auto")
    out: dict[str, float] = {}
    m = P.cast_for_inference(copy.deepcopy(model), prec)
    prompts = [e.prompt for e in load_task(S.task, "test", int(evaluate_default(study, "task_samples", 128)))]
    path = {"generation": generation} if "generation" in inspect.signature(generate).parameters else {}
    out["generation"] = _timed(lambda: generate(m, tok, prompts, max_new_tokens=S.gen[1], batch_size=S.gen[0],
                                                **path)) / len(prompts)
    n = 8 if quick else S.ppl[0]
    w = torch.randint(10, len(tok) - 10, (n, S.ppl[1]), generator=torch.Generator().manual_seed(0))
    window_nll(m, w[:2])  # warm-up
    out["ppl"] = _timed(lambda: window_nll(m, w)) / n
    ref = copy.deepcopy(m)
    if importlib.util.find_spec("ptqlib.stages.reference") is None:  # a commit without the cache
        out["kl"] = out["kl_cold"] = _timed(lambda: window_nll(m, w, reference=ref)) / n
    else:
        from ptqlib.stages.reference import CachedReference

        with tempfile.TemporaryDirectory() as d:
            out["kl_cold"] = _timed(lambda: window_nll(m, w, reference=CachedReference(ref, d))) / n
            out["kl"] = _timed(lambda: window_nll(m, w, reference=CachedReference(ref, d))) / n
    steps, layers = (2, 1) if quick else (4, 2)
    b, L = S.train_batch, S.train_seq
    qbase = copy.deepcopy(model)
    rtn_quantize_model(qbase, bits=4, group_size=S.group_size, progress=False)
    ad = {"rank": S.rank, "alpha": S.alpha}
    out["full"] = b * L / B.train_speed(model, tok, "full", "auto", steps, b, L, S.train_labelled)
    out["qlora"] = b * L / B.train_speed(qbase, tok, "qlora", "auto", steps, b, L, S.train_labelled, **ad)
    out["l4q"] = b * L / B.train_speed(model, tok, "l4q", "auto", steps, b, L, S.train_labelled,
                                       group_size=S.group_size, **ad)
    tps, _ = B.gptq_layer_speed(model, "auto", *S.calib, len(tok), S.group_size, layers)
    out["gptq"] = S.calib[0] * S.calib[1] / tps
    return out


# ---------------------------------------------------------------------------------------------
# the study's stage mix (this checkout's library)
# ---------------------------------------------------------------------------------------------
def stage_mix(study: str) -> Counter:
    """Units of each measured kind that ``study`` runs: examples generated, windows with and without a
    reference (``kl_cold``: the first KL stage of each reference), training steps per method, GPTQ layers."""
    sys.path.insert(0, str(ROOT))
    from ptqlib.engine.runner import Runner
    from ptqlib.models import model_config
    from ptqlib.study.schema import load_study

    class AnyChoice(dict):  # every candidate scores alike: the first is chosen; a stage's cost is not its lr's
        def get(self, key, default=None):
            return 0.0

    class Choices:
        previous_choices = staticmethod(lambda runner: AnyChoice())

    with tempfile.TemporaryDirectory() as runs:
        r = Runner(load_study(study), runs, Path(runs) / "reports", reporter=Choices())
        plan = r.plan()
    mix: Counter = Counter()
    warm: set = set()
    for sid in plan:
        node = r.nodes[sid]
        p = node.params
        if node.kind == "evaluate" and p.get("runtime", "torch") == "torch":
            mix["generation"] += p.get("task_samples", 0)
            windows = p.get("ppl_samples", 0) * len(p.get("ppl_sources", []))
            if p.get("kl_reference") and node.reference is not None:
                mix["kl" if node.reference in warm else "kl_cold"] += windows
                warm.add(node.reference)
            else:
                mix["ppl"] += windows
        elif node.kind == "finetune":
            method = p.get("method")
            mix[method if method in TRAINING else "full"] += p.get("steps", 0)
        elif node.kind == "quantize" and p.get("method") == "gptq":
            mix["gptq"] += (model_config(node.model, allow_network=False) or {}).get("num_hidden_layers", 30)
    return mix


# ---------------------------------------------------------------------------------------------
# the comparison
# ---------------------------------------------------------------------------------------------
def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], check=True, capture_output=True, text=True).stdout.strip()


def _run_probe(tree: Path, study: str, quick: bool, threads: int, generation: str) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": str(threads)}
    cmd = ([sys.executable, str(Path(__file__).resolve()), "--probe", study, "--generation", generation]
           + (["--quick"] if quick else []))
    res = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith(PROBE)]
    if res.returncode or not lines:
        raise SystemExit(f"the probe at {tree.name} failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
    return json.loads(lines[-1][len(PROBE):])


def weighed(unit: dict[str, float], mix: Counter) -> float:
    return sum(unit[k] * n for k, n in mix.items())


def report(a: str, b: str, ua: dict, ub: dict, mix: Counter) -> list[str]:
    """The table and the four closing lines (B's speed over A's)."""
    lines = [f"{'kind':11s} {'A s/unit':>10s} {'B s/unit':>10s} {'B/A speed':>9s}   units in the study"]
    for k in ua:
        lines.append(f"{k:11s} {ua[k]:10.4f} {ub[k]:10.4f} {ua[k] / ub[k]:8.2f}x   {mix.get(k, 0)}")
    ppl_mix = Counter({k: n for k, n in mix.items() if k in ("ppl", "kl", "kl_cold")})
    train = [ua[k] / ub[k] for k in TRAINING]
    lines += [f"A = {a}, B = {b}",
              f"generation: {ua['generation'] / ub['generation']:.2f}x",
              f"perplexity: {weighed(ua, ppl_mix) / weighed(ub, ppl_mix):.2f}x",
              f"training: {math.exp(sum(map(math.log, train)) / len(train)):.2f}x",
              f"study stage time: {weighed(ua, mix) / weighed(ub, mix):.2f}x"]
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("a", nargs="?", help="the commit to compare against (e.g. 892662b)")
    ap.add_argument("b", nargs="?", help="the commit measured (e.g. HEAD)")
    ap.add_argument("--study", default="parameters/default.yaml", help="B's study file (its shapes and stage mix)")
    ap.add_argument("--quick", action="store_true", help="repeat less (one round unless --rounds)")
    ap.add_argument("--rounds", type=int, default=None, help="alternating rounds A, B (default 2; --quick 1)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--generation", choices=("study", "prefix", "generate"), default="study",
                    help="the generation path measured where a commit has both: the study's (default), or one")
    ap.add_argument("--probe", metavar="STUDY", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.probe:
        import torch

        import ptqlib

        if not Path(ptqlib.__file__).resolve().is_relative_to(Path.cwd().resolve()):
            raise SystemExit(f"the probe imported {ptqlib.__file__}, not the worktree's {Path.cwd()}")
        torch.set_num_threads(args.threads)
        print(PROBE + json.dumps(probe(args.probe, args.quick, args.generation)), flush=True)
        return 0
    if not (args.a and args.b):
        ap.error("give two commits: A B (for example 892662b HEAD)")
    shas = []
    for c in (args.a, args.b):
        try:
            shas.append(_git("rev-parse", "--verify", f"{c}^{{commit}}"))
        except subprocess.CalledProcessError:
            ap.error(f"{c!r} is not a commit of {ROOT}")
    rounds = args.rounds or (1 if args.quick else 2)
    if rounds < 1:
        ap.error(f"--rounds {rounds}: give at least 1")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed run still removes its worktrees
    with tempfile.TemporaryDirectory(prefix="compare-") as tmp:
        trees = [Path(tmp) / f"{i}-{s[:10]}" for i, s in enumerate(shas)]
        for t, s in zip(trees, shas):
            _git("worktree", "add", "--detach", str(t), s)
        try:
            study = trees[1] / args.study
            if not study.is_file():
                ap.error(f"--study {args.study}: not a file at {args.b}")
            mix = stage_mix(str(study))
            generation = (evaluate_default(str(study), "generation", "prefix") if args.generation == "study"
                          else args.generation)
            print(f"B's study {args.study}: {dict(mix)}; generation: {generation}", flush=True)
            best: list[dict[str, float]] = [{}, {}]
            for r in range(rounds):
                for i, t in enumerate(trees):
                    got = _run_probe(t, str(study), args.quick, args.threads, generation)
                    best[i] = {k: min(v, best[i].get(k, math.inf)) for k, v in got.items()}
                    print(f"round {r + 1}, {'AB'[i]} ({shas[i][:10]}): "
                          + ", ".join(f"{k} {v:.4f}" for k, v in got.items()), flush=True)
        finally:
            for t in trees:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(t)], capture_output=True)
    print("\n".join(report(shas[0][:10], shas[1][:10], best[0], best[1], mix)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How long a study's stages took, from their records: the whole-study figure of a precision or a machine.

    python bench/study_time.py parameters/default.yaml [--runs runs]
    python bench/study_time.py A.yaml B.yaml --runs runs_a runs_b     # and B / A per stage kind

For each study file: its planned stages (the test-set pipelines of a selection included once the
selection is recorded), how many have a finished record in the runs directory, and the sum of their
recorded wall seconds per stage kind (``evaluate(validation)`` apart from ``evaluate``), with the
precision, threads and package versions the records name. With two studies over the same pipelines
(say the default study at ``precision: auto`` and the same file with ``precision: fp32``), the ratio
of their stage times per kind. Stage time excludes the install and the runner's own start-up and
report (seconds), so a fresh-clone ``make study`` takes its install on top. Reads records only: runs
nothing, and is as noisy as the machine was when the stages ran.

A second table splits each kind's stage time into the work the stage timed itself (``COMPUTE``: the
training steps, the quantization, the perplexity windows and the generations) and the rest: the stage
process's start-up (kernel, imports), loading and saving models, scoring, the stage's own report. The
rest is the same work in fp32 and bf16, so it bounds what a precision can gain on a whole study.
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# the metrics in which a stage records the seconds of its own work (the rest of its wall time is overhead)
COMPUTE = ("train_seconds", "quant_seconds", "ppl_seconds", "gen_seconds")


def stage_times(study_file: str, runs: str) -> dict:
    """``{"planned", "recorded", "seconds": {kind: s}, "compute": {kind: s}, "precision", "threads",
    "versions"}`` of a study (``compute``: the part of ``seconds`` the stages timed as their own work)."""
    from ptqlib.engine.record import complete, versions_label
    from ptqlib.engine.runner import Runner
    from ptqlib.report import tables
    from ptqlib.study.schema import load_study

    r = Runner(load_study(study_file), runs, ROOT / "reports", reporter=tables)  # reads records; writes nothing
    plan = r.plan()
    seconds: dict[str, float] = defaultdict(float)
    compute: dict[str, float] = defaultdict(float)
    seen: dict[str, set] = {"precision": set(), "threads": set(), "versions": set()}
    recorded = 0
    for sid in plan:
        rec = r.record(sid)
        if not complete(rec):
            continue
        recorded += 1
        node = r.nodes[sid]
        kind = node.kind + ("(validation)" if node.params.get("split") == "validation" else "")
        seconds[kind] += rec["timings"]["wall_s"]
        metrics = rec.get("metrics") or {}
        compute[kind] += sum(float(metrics.get(k) or 0.0) for k in COMPUTE)
        seen["precision"].add(str(rec.get("params", {}).get("precision", "?")))
        seen["threads"].add(str((rec.get("device") or {}).get("torch_threads", "?")))
        seen["versions"].add(versions_label(rec.get("versions")) or "?")
    return {"planned": len(plan), "recorded": recorded, "seconds": dict(seconds), "compute": dict(compute),
            **{k: ", ".join(sorted(v)) for k, v in seen.items()}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("studies", nargs="+", help="study files (one or two)")
    ap.add_argument("--runs", nargs="+", default=["runs"], help="the runs directory of each study (one for all)")
    a = ap.parse_args(argv)
    if len(a.studies) > 2:
        ap.error(f"give one or two study files, not {len(a.studies)}")
    if len(a.runs) not in (1, len(a.studies)):
        ap.error(f"--runs: one directory, or one per study ({len(a.studies)}); got {len(a.runs)}")
    runs = a.runs * len(a.studies) if len(a.runs) == 1 else a.runs
    out = [stage_times(s, d) for s, d in zip(a.studies, runs)]
    kinds = list(dict.fromkeys(k for o in out for k in o["seconds"]))
    for s, d, o in zip(a.studies, runs, out):
        print(f"{s} (runs {d}): {o['recorded']} of {o['planned']} stages recorded; precision {o['precision']}, "
              f"threads {o['threads']}; {o['versions']}")
    head = "| stage kind | " + " | ".join(Path(s).stem + " (s)" for s in a.studies) + (" | ratio |" if len(out) == 2 else " |")
    print("\n" + head + "\n|" + "---|" * (head.count("|") - 1))
    for k in kinds + ["total"]:
        vals = [sum(o["seconds"].values()) if k == "total" else o["seconds"].get(k, 0.0) for o in out]
        ratio = f" | {vals[1] / vals[0]:.2f}x |" if len(out) == 2 and vals[0] else (" | |" if len(out) == 2 else " |")
        print(f"| {k} | " + " | ".join(f"{v:.0f}" for v in vals) + ratio)
    print("\ninside the stages: the work they timed (" + ", ".join(COMPUTE) + ") / the rest (start-up, "
          "loading, saving, scoring, report), seconds")
    head = "| stage kind | " + " | ".join(Path(s).stem + " work / rest" for s in a.studies) + " |"
    print("\n" + head + "\n|" + "---|" * (head.count("|") - 1))
    for k in kinds + ["total"]:
        cells = []
        for o in out:
            wall = sum(o["seconds"].values()) if k == "total" else o["seconds"].get(k, 0.0)
            work = sum(o["compute"].values()) if k == "total" else o["compute"].get(k, 0.0)
            cells.append(f"{work:.0f} / {wall - work:.0f}")
        print(f"| {k} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

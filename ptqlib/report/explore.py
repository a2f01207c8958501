"""For a reader exploring a study in JupyterLab: the claims at a glance (:func:`plot_claims`), two pipelines
example by example (:func:`flips`), and the run directory of any stage (:func:`run_dir`), so a notebook
opened on one stage's artifact needs no id copied from ``--dry-run``."""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from ptqlib import relations
from ptqlib.metrics import lower_is_better

VERDICT_COLOURS = {"holds": "#2a9d4b", "does not hold": "#c0392b"}  # undecided: grey


def plot_claims(table: pd.DataFrame, title: str = ""):
    """A forest plot of a study's claims (``claims.csv`` rows): one panel per claim, its own scale, the
    difference a - b (or the recovered fraction of a ``ref`` claim) with its 95% interval, the boundaries of its
    relation (``min_effect``, sign-flipped where lower is better) as dashed lines, green where it holds, red
    where it does not, grey undecided."""
    import matplotlib.pyplot as plt

    rows = table[table["difference"].notna()] if len(table) else table
    if not len(rows):
        return None
    fig, axes = plt.subplots(len(rows), 1, figsize=(8, 0.62 * len(rows) + 0.8), squeeze=False)
    for ax, (_, r) in zip(axes[:, 0], rows.iterrows()):
        verdict = str(r.get("verdict_holm") or r["verdict"])
        colour = VERDICT_COLOURS.get(verdict, "#888888")
        d, lo, hi = float(r["difference"]), float(r["ci_low"]), float(r["ci_high"])
        if math.isfinite(lo) and math.isfinite(hi):
            ax.errorbar([d], [0], xerr=[[d - lo], [hi - d]], fmt="o", color=colour, capsize=4)
        else:
            ax.plot([d], [0], "o", color=colour)
        fraction = isinstance(r.get("ref"), str) and bool(r.get("ref"))  # a recovered fraction: no sign to flip
        sign = -1.0 if lower_is_better(str(r["metric"])) and not fraction else 1.0
        bounds = [sign * b for b in relations.relation(str(r["relation"])).bounds(float(r["min_effect"]))]
        for b in bounds:
            if math.isfinite(b):
                ax.axvline(b, color="black", ls="--", lw=0.8)
        ax.set_yticks([])
        ax.set_ylabel(f"{str(r['claim'])[:60]}\n({r['metric']}, {verdict})", rotation=0, ha="right", va="center",
                      fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
    axes[0, 0].set_title(title or "claims: a - b with its 95% interval; dashed: the relation's boundary")
    fig.tight_layout()
    return fig


def flips(units: pd.DataFrame, a: str, b: str, metric: str = "field_f1") -> tuple[dict, pd.DataFrame]:
    """Pipelines ``a`` and ``b`` (families) example by example on the task: per example the mean of ``metric``
    over each side's seeds and their difference -> ({a better, b better, equal: counts}, the examples sorted
    from a's largest win to b's). Where lower is better, "better" follows it."""
    task = units[(units["group"] == "task") & units["family"].isin([a, b])]
    if metric not in task or not len(task):
        raise ValueError(f"units have no {metric!r} of task examples for {a!r} and {b!r}; pipelines with task "
                         f"examples: {', '.join(sorted(units.loc[units['group'] == 'task', 'family'].unique()))}")
    per = task.pivot_table(index="unit", columns="family", values=metric, aggfunc="mean")
    missing = [f for f in (a, b) if f not in per]
    if missing:
        raise ValueError(f"no task units for {', '.join(map(repr, missing))}")
    out = pd.DataFrame({a: per[a], b: per[b]}).dropna()
    out["difference"] = out[a] - out[b]
    better = -out["difference"] if lower_is_better(metric) else out["difference"]
    counts = {f"{a} better": int((better > 0).sum()), f"{b} better": int((better < 0).sum()),
              "equal": int((better == 0).sum())}
    return counts, out.loc[better.sort_values(ascending=False).index]


def run_dir(study_file: str | Path, pipeline: str, kind: str = "evaluate", occurrence: int = -1,
            runs: str | Path | None = None) -> Path:
    """The run directory of a pipeline's stage: ``kind`` (quantize / finetune / evaluate), the last of that kind
    unless ``occurrence`` says which (0: the first). ``pipeline`` as in results.csv (``ft16[seed=1]``); ``runs``:
    the stage cache (default: ``runs/`` beside the study file's ``parameters/``, wherever the notebook runs).
    Raises ``ValueError`` naming the valid pipelines or kinds; the directory may not exist yet (not run)."""
    from ptqlib.engine.runner import Runner
    from ptqlib.report import tables
    from ptqlib.study.schema import load_study

    root = Path(study_file).resolve().parent.parent
    runs = root / "runs" if runs is None else Path(runs)
    runner = Runner(load_study(study_file, allow_network=False), runs, root / "reports", reporter=tables)
    if pipeline not in runner.chains:
        raise ValueError(f"pipeline {pipeline!r} is not in {study_file}; valid: {', '.join(runner.chains)}")
    ids = [sid for sid in runner.chains[pipeline] if runner.nodes[sid].kind == kind]
    if not ids:
        kinds = sorted({runner.nodes[s].kind for s in runner.chains[pipeline]})
        raise ValueError(f"pipeline {pipeline!r} has no {kind} stage; its stages: {', '.join(kinds)}")
    return runs / ids[occurrence]

"""Analysis of a study: per-pipeline summaries over seeds, the claims table (``claims``), settings and
cost tables, plots, and the report's files (``load_outputs``, ``write_claims``). The claims' verdict rule
is in ``ptqlib.report.claims``."""
from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape

import numpy as np
import pandas as pd

from ptqlib.files import write_atomic
from ptqlib.metrics import lower_is_better, plotted, shown
from ptqlib.report.cells import labelled
from ptqlib.report.claims import check_claims
from ptqlib.study.kinds import KINDS


def summarise(results: pd.DataFrame, metrics: list[str] | None = None) -> pd.DataFrame:
    """Mean, std over seeds and n per pipeline family (and grid point other than the seed)."""
    df = results[results.get("status", "ok") == "ok"] if "status" in results else results
    metrics = [m for m in (metrics or shown("quality") + shown("cost")) if m in df]
    grid = [c for c in df.columns if c.startswith("grid.") and c != "grid.seed"]
    keys = ["family", "model"] + grid
    agg = df.groupby(keys, dropna=False)[metrics].agg(["mean", "std", "count"])
    return agg


def mean_pm(results: pd.DataFrame, metrics: list[str], digits: int = 3) -> pd.DataFrame:
    """Compact ``"mean ± sd"`` table, one row per pipeline family in study order, for reports.

    ``sd`` is the seed-to-seed standard deviation; with one run it is left out (``"0.875"``).
    Families without a finished run are dropped; a metric the study lacks is an error.
    """
    missing = [m for m in metrics if m not in results]
    if missing:
        raise KeyError(f"no column {missing} in the results; available: {sorted(results.columns)}")
    df = results[results["status"] == "ok"] if "status" in results else results
    rows = {}
    for fam in dict.fromkeys(df["family"]):  # first-seen order = the study file's order
        sub = df[df["family"] == fam]
        cells = {"n": len(sub)}
        for m in metrics:
            v = pd.to_numeric(sub[m], errors="coerce").dropna()
            if not len(v):
                cells[m] = ""
            elif len(v) == 1:
                cells[m] = f"{v.iloc[0]:.{digits}f}"
            else:
                cells[m] = f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}"
        rows[fam] = cells
    return pd.DataFrame.from_dict(rows, orient="index")


def _settings(method: str) -> tuple[str, ...]:
    """The settings a reader needs next to a number (results.csv columns): the method's entry."""
    from ptqlib.methods import finetune_methods, quantize_methods

    entry = quantize_methods().get(method) or finetune_methods().get(method)
    return entry.settings if entry else ()


def _stage_prefixes(chain: str) -> list[str]:
    """Column prefixes of a pipeline's stages, from its chain label: quantize, finetune, finetune2, ..."""
    seen: dict[str, int] = {}
    out = []
    for label in chain.split(" -> "):
        kind = label.split("(", 1)[0].strip()
        if kind in KINDS and not KINDS[kind].implicit:
            seen[kind] = seen.get(kind, 0) + 1
            out.append(kind + (str(seen[kind]) if seen[kind] > 1 else ""))
    return out


def settings_table(results: pd.DataFrame) -> pd.DataFrame:
    """One row per pipeline family: each stage with the settings that matter for it, and the seeds."""
    rows = {}
    for fam in dict.fromkeys(results["family"]):
        sub = results[results["family"] == fam]
        r = sub.iloc[0]
        parts = []
        for pre in _stage_prefixes(str(r.get("stages", ""))):
            method = r.get(f"{pre}.method")
            if not isinstance(method, str):
                continue
            kv = []
            for k in _settings(method):
                v = r.get(f"{pre}.{k}")
                if v is not None and not (isinstance(v, float) and math.isnan(v)):
                    kv.append(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}")
            parts.append(f"{pre.rstrip('0123456789')}({method}" + (": " + ", ".join(kv) if kv else "") + ")")
        grid = {c[5:]: sorted(set(sub[c].dropna())) for c in sub.columns if c.startswith("grid.") and c != "grid.seed"}
        rows[fam] = {"stages": " -> ".join(parts + ["evaluate"]),
                     "grid": "; ".join(f"{k} = {', '.join(map(str, v))}" for k, v in grid.items() if v),
                     "seeds": ", ".join(map(str, sorted(set(sub["seed"])))), "model": r.get("model", "")}
    return pd.DataFrame.from_dict(rows, orient="index")


def _pipeline_lines(sets: dict[str, list[str]]) -> list[str]:
    """``- label: pipeline, ...`` per label (at most six pipelines named), escaped for the report's markdown."""
    return [f"- {escape(label)}: {escape(', '.join(p[:6]))}{' ...' if len(p) > 6 else ''}" for label, p in sets.items()]


def machines_note(results: pd.DataFrame) -> str:
    """A markdown note on the machines the study's stages ran on (results.csv's ``machines``): the one,
    or a warning naming the pipelines of each when there are several. GPTQ's codes and everything
    downstream differ between CPUs under the same stage id (a 0.05-0.08 field F1 move per seed was seen
    between an Intel AMX and an AMD Zen 4 machine), so a report that mixes them says so."""
    if "machines" not in results:
        return ""
    m = results["machines"].fillna("").astype(str).replace("", "unknown (recorded before machines were)")
    sets = {label: results.loc[m == label, "pipeline"].tolist() for label in dict.fromkeys(m)}
    if len(sets) == 1 and " | " not in next(iter(sets)):
        return f"Every stage ran on {next(iter(sets))}."
    lines = _pipeline_lines(sets)
    return ("**The stages ran on more than one machine** (the same stage id computes different bits on different "
            "CPUs and GPUs; numbers from each are not replicates of one another):\n" + "\n".join(lines))


def models_note(results: pd.DataFrame) -> str:
    """A markdown note naming each model the study's runs used, with the licence its weights come under
    (``ptqlib.models.LICENCES``); a local or hub model's licence is its publisher's, which this package
    cannot know."""
    from ptqlib.models import EMBEDDED, LICENCES

    if "model" not in results:
        return ""
    names = [str(m) for m in dict.fromkeys(results["model"].dropna())]
    lines = [f"- `{m}`: {EMBEDDED[m]}. Licence: {LICENCES[m]}." if m in LICENCES
             else f"- {escape(m)}: not embedded; its licence is its publisher's (see its model card)." for m in names]
    return ("**Models**\n" + "\n".join(lines)) if lines else ""


def versions_note(results: pd.DataFrame) -> str:
    """A markdown note on the package versions the study's stages ran under (results.csv's
    ``versions``): which ones, or a warning naming the pipelines of each set when they differ,
    since a stage id does not hash versions and a cached stage keeps its versions' numbers."""
    if "versions" not in results:
        return ""
    v = results["versions"].fillna("").astype(str)  # a row kept from a previous report keeps its versions
    sets = {label: results.loc[v == label, "pipeline"].tolist() for label in dict.fromkeys(v) if label}
    if not sets:
        return ""
    if len(sets) == 1 and " | " not in next(iter(sets)):
        return f"Every stage ran with {next(iter(sets))}."
    lines = _pipeline_lines(sets)
    return ("**The stages ran under different package versions** (a cached stage keeps the numbers of the "
            "versions it ran with; `ptqlib run --force` re-runs them here):\n" + "\n".join(lines))


def cost_table(results: pd.DataFrame) -> pd.DataFrame:
    """Mean wall seconds per pipeline family of each of its stages (quantize, finetune, finetune2,
    evaluate, ...) and their total: a stage shared by several pipelines is counted in each."""
    df = results[results["status"] == "ok"] if "status" in results else results
    cols = [c for c in df.columns if c.startswith("wall_s.") and c != "wall_s.total"]
    out = df.groupby("family", sort=False)[cols + (["wall_s.total"] if "wall_s.total" in df else [])].mean()
    return out.rename(columns=lambda c: c.removeprefix("wall_s.") + " (s)")


def plot_costs(results: pd.DataFrame, title: str = ""):
    """Stacked horizontal bars: each pipeline's stage costs (mean over seeds)."""
    import matplotlib.pyplot as plt

    t = cost_table(results).drop(columns=["total (s)"], errors="ignore").fillna(0)
    if t.empty:
        return None
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(t) + 1.6))
    t.iloc[::-1].plot.barh(stacked=True, ax=ax, width=0.7)
    ax.set_xlabel("wall seconds per stage (mean over seeds)")
    ax.set_ylabel("")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_metrics(results: pd.DataFrame, metrics: list[str], title: str = ""):
    """One bar chart per metric: mean per pipeline with seed-to-seed std as error bars."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    metrics = [m for m in metrics if m in results and pd.to_numeric(results[m], errors="coerce").notna().any()]
    if not metrics:
        return None
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 0.45 * results["pipeline"].nunique() + 2.2),
                             squeeze=False)
    label = results["pipeline"].str.replace(r",?seed=\d+", "", regex=True).str.replace("[]", "", regex=False)
    data = results[["pipeline", *metrics]].assign(label=label)  # only what is drawn (a wide results frame is fragmented)
    for ax, m in zip(axes[0], metrics):
        sns.barplot(data=data, y="label", x=m, ax=ax, errorbar="sd", color="#4c72b0")
        ax.set_ylabel("")
        ax.set_title(m + (" (lower is better)" if lower_is_better(m) else ""))
    fig.suptitle(title)
    fig.tight_layout()
    return fig


# ---- what the analysis notebook (04) shows and writes --------------------------------------------
CLAIM_COLUMNS = ["claim", "metric", "tested", "mean_a", "mean_b", "difference", "interval", "seed_sd", "n_seeds",
                 "n_examples", "verdict", "p_holds", "p_fails", "p_holm", "verdict_holm", "flags"]


@dataclass
class StudyOutputs:
    """What ``python -m ptqlib run`` leaves in ``reports/<study>/`` (see ``ptqlib.report.tables``)."""

    results: pd.DataFrame  # results.csv: one row per pipeline run
    units: pd.DataFrame | None  # units.csv: per-example scores and per-window NLL (None: not written)
    meta: dict  # study.json: file, description, claims, runs_dir
    stages: dict  # stages.json: stage id -> label, status, pipelines, position


def load_outputs(study_dir) -> StudyOutputs:
    import json
    from pathlib import Path

    sd = Path(study_dir)
    if not (sd / "results.csv").exists():
        raise FileNotFoundError(f"{sd}: no results.csv; run the study first (python -m ptqlib run <study file>)")

    def _json(name: str) -> dict:
        return json.loads((sd / name).read_text()) if (sd / name).exists() else {}

    units = pd.read_csv(sd / "units.csv") if (sd / "units.csv").exists() else None
    return StudyOutputs(pd.read_csv(sd / "results.csv"), units, _json("study.json"), _json("stages.json"))


def write_summary(results: pd.DataFrame, study_dir) -> pd.DataFrame:
    """Mean ± sd per pipeline of the quality metrics, size and speed -> ``summary.csv`` (returned)."""
    from pathlib import Path

    compact = mean_pm(results, [m for m in shown("quality") + plotted("deployment") if m in results])
    write_atomic(Path(study_dir) / "summary.csv", compact.to_csv(index_label="pipeline"))
    return compact


def write_claims(claims: list[dict], results: pd.DataFrame, units: pd.DataFrame | None, study_dir) -> pd.DataFrame:
    """:func:`check_claims` -> ``claims.csv`` (machine-readable); returns the table with an
    ``interval`` column (``[lo, hi]`` as text, empty where there is none) and each claim's text naming its cell
    (a study over several models or tasks) for display."""
    from pathlib import Path

    table = check_claims(claims, results, units)
    write_atomic(Path(study_dir) / "claims.csv", table.to_csv(index=False))
    append_history(table, results, study_dir)
    shown = table.assign(interval=[f"[{lo:+.3f}, {hi:+.3f}]" if not (math.isnan(lo) or math.isnan(hi)) else ""
                                   for lo, hi in zip(table.ci_low, table.ci_high)])
    if "cell" in table:  # a study over several models or tasks: each row names its cell
        shown["claim"] = [labelled(c, cell) for c, cell in zip(table["claim"], table["cell"].fillna(""))]
    return shown


def analysis_code() -> bytes:
    """The source of the code that turns results into verdicts (this package, the metric and relation
    registries): a report whose analysis ran on other code is stale (``tables.analyse``)."""
    from pathlib import Path

    pkg = Path(__file__).resolve().parent.parent
    return b"".join(f.read_bytes() for f in [*sorted((pkg / "report").glob("*.py")), pkg / "metrics.py",
                                             pkg / "relations.py"])


HISTORY_COLUMNS = ["date", "commit", "machines", "seeds", "claim", "metric", "difference", "ci_low", "ci_high",
                   "verdict", "verdict_holm"]


def append_history(table: pd.DataFrame, results: pd.DataFrame, study_dir) -> bool:
    """Add this analysis's verdicts to ``history.csv`` (one row per claim: UTC date, library commit, the
    machines and seeds of the runs, difference, interval, verdicts), so a study keeps the verdicts of every
    earlier analysed run. An analysis that repeats the last one (same commit, machines, seeds and numbers)
    adds nothing. Returns whether rows were added."""
    import datetime
    from pathlib import Path

    from ptqlib.engine.record import git_commit
    from ptqlib.engine.stage import ROOT

    path = Path(study_dir) / "history.csv"
    machines = " | ".join(dict.fromkeys(
        m for v in results.get("machines", pd.Series(dtype=str)).fillna("").astype(str) for m in v.split(" | ") if m))
    seeds = " ".join(str(s) for s in sorted(set(pd.to_numeric(results["seed"], errors="coerce").dropna().astype(int))))
    new = table[["claim", "metric", "difference", "ci_low", "ci_high", "verdict", "verdict_holm"]].copy()
    if "cell" in table:  # a study over several models or tasks: one row per claim and cell
        new["claim"] = [labelled(c, cell) for c, cell in zip(table["claim"], table["cell"].fillna(""))]
    new.insert(0, "seeds", seeds)
    new.insert(0, "machines", machines or "not recorded")
    new.insert(0, "commit", git_commit(ROOT) or "unknown")
    if path.exists():
        old = pd.read_csv(path, keep_default_na=False, dtype=str)
        last = old[old["date"] == old["date"].iloc[-1]] if len(old) else old
        same = (len(last) == len(new) and (last["commit"] == new["commit"].iloc[0]).all()
                and (last["machines"] == (machines or "not recorded")).all() and (last["seeds"] == seeds).all()
                and last["verdict_holm"].tolist() == new["verdict_holm"].tolist()
                and np.allclose(pd.to_numeric(last["difference"], errors="coerce"), new["difference"], equal_nan=True))
        if same:
            return False
    new.insert(0, "date", datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"))
    text = new[HISTORY_COLUMNS].to_csv(index=False, header=not path.exists())
    write_atomic(path, (path.read_text() if path.exists() else "") + text)
    return True


def drop_claims(study_dir) -> list[str]:
    """Remove ``claims.csv`` and ``plan.csv`` of a study that declares no claims (any more): left in place,
    ``python -m ptqlib findings`` kept reporting the verdicts of claims the study file had dropped.
    ``history.csv`` stays (it is the record of earlier runs). Returns the names removed."""
    from pathlib import Path

    gone = []
    for name in ("claims.csv", "plan.csv"):
        try:
            (Path(study_dir) / name).unlink()
        except FileNotFoundError:  # not there (or a second runner removed it first)
            continue
        gone.append(name)
    return gone


def redecide(study_dir) -> pd.DataFrame:
    """Decide the claims of ``study.json`` again from the committed ``results.csv`` / ``units.csv``
    of ``reports/<study>/`` -> ``claims.csv``; runs no stage and leaves the other files alone."""
    out = load_outputs(study_dir)
    if not out.meta.get("claims"):
        raise ValueError(f"{study_dir}: study.json declares no claims; nothing to decide")
    return write_claims(out.meta["claims"], out.results, out.units, study_dir)


def sample_generations(results: pd.DataFrame, runs_dir, n: int = 2) -> pd.DataFrame:
    """The first ``n`` generations of every pipeline's evaluate stage, next to the references
    (read from the stage records ``runs/<eval_stage>/metrics.json``)."""
    import json
    from pathlib import Path

    rows = []
    for r in results.itertuples():
        rec = Path(runs_dir) / str(r.eval_stage) / "metrics.json"
        if rec.exists():
            gens = json.loads(rec.read_text()).get("outputs", {}).get("generations") or []
            rows += [{"example": i, "pipeline": r.pipeline, "output": g["output"], "reference": g["reference"]}
                     for i, g in enumerate(gens[:n])]
    if not rows:
        return pd.DataFrame(columns=["example", "pipeline", "output", "reference"])
    return pd.DataFrame(rows).sort_values(["example", "pipeline"]).drop_duplicates(["example", "pipeline"])

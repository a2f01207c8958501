"""Analysis of a study: per-pipeline summaries over seeds, claims with verdicts, plots.

Claims are declared in the study file::

    claims:
      - claim: PTQ-QLoRA beats PTQ            # free text shown in the report
        a: ft_nf4_qlora                       # pipeline family on the left
        b: ft_nf4                             # ... and on the right
        metric: field_f1                      # a column of results.csv
        relation: ">"                         # ">" beats, ">=" matches or beats, "==" unchanged

Verdict rule (the one the study promises): ``d = mean(a) - mean(b)``, sign-flipped for metrics
where lower is better (perplexity), and ``spread`` = the larger of the two pipelines' seed-to-seed
standard deviations. A difference counts only when ``|d| > spread``. With fewer than 2 seeds on a
pipeline that trains, the spread is unknown and the verdict is "undecided".
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

LOWER_IS_BETTER = {"ppl", "size_mb_deploy", "size_mb_stored", "train_seconds", "step_seconds", "peak_mem_mb",
                   "train_loss_last"}
RELATIONS = (">", ">=", "==")
QUALITY = ["ppl", "exact_match", "field_f1", "rouge_l", "fact_precision", "fact_recall"]
COST = ["size_mb_deploy", "size_mb_stored", "gen_tokens_per_s", "finetune.train_seconds", "finetune.peak_mem_mb",
        "quantize.quant_seconds"]


@dataclass
class Claim:
    claim: str
    a: str
    b: str
    metric: str
    relation: str = ">"


def summarise(results: pd.DataFrame, metrics: list[str] | None = None) -> pd.DataFrame:
    """Mean, std over seeds and n per pipeline family (and grid point other than the seed)."""
    df = results[results.get("status", "ok") == "ok"] if "status" in results else results
    metrics = [m for m in (metrics or QUALITY + COST) if m in df]
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


def _stats(df: pd.DataFrame, family: str, metric: str) -> tuple[float, float, int, bool]:
    sub = df[df["family"] == family]
    vals = pd.to_numeric(sub[metric], errors="coerce").dropna() if metric in sub else pd.Series(dtype=float)
    trains = bool(sub["stages"].str.contains("finetune").any()) if "stages" in sub and len(sub) else False
    n_seeds = sub["seed"].nunique() if "seed" in sub else 1
    std = float(vals.std(ddof=1)) if len(vals) > 1 and n_seeds > 1 else (0.0 if not trains else math.nan)
    return (float(vals.mean()) if len(vals) else math.nan), std, len(vals), trains


def verdict(claim: Claim, results: pd.DataFrame) -> dict:
    """The measured difference, the spread and holds / does not hold / undecided."""
    ma, sa, na, _ = _stats(results, claim.a, claim.metric)
    mb, sb, nb, _ = _stats(results, claim.b, claim.metric)
    # stage-prefixed columns ("finetune.peak_mem_mb") are judged by their metric's name
    sign = -1.0 if claim.metric.rsplit(".", 1)[-1] in LOWER_IS_BETTER else 1.0
    d = sign * (ma - mb)
    spread = max(sa, sb) if not (math.isnan(sa) or math.isnan(sb)) else math.nan
    row = {"claim": claim.claim, "a": claim.a, "b": claim.b, "metric": claim.metric, "relation": claim.relation,
           "mean_a": ma, "mean_b": mb, "difference": ma - mb, "spread": spread, "n_a": na, "n_b": nb}
    if na == 0 or nb == 0 or math.isnan(d):
        row["verdict"] = "undecided (no data)"
    elif math.isnan(spread):
        row["verdict"] = "undecided (needs >= 2 seeds)"
    elif claim.relation == ">":
        row["verdict"] = "holds" if d > spread else ("does not hold" if d < -spread else "undecided (within noise)")
    elif claim.relation == ">=":
        row["verdict"] = "holds" if d >= -spread else "does not hold"
    else:  # "=="
        row["verdict"] = "holds" if abs(d) <= spread else "does not hold"
    return row


def check_claims(claims: list[dict], results: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame([verdict(Claim(**c), results) for c in claims])


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
    data = results.assign(label=label)
    for ax, m in zip(axes[0], metrics):
        sns.barplot(data=data, y="label", x=m, ax=ax, errorbar="sd", color="#4c72b0")
        ax.set_ylabel("")
        ax.set_title(m + (" (lower is better)" if m in LOWER_IS_BETTER else ""))
    fig.suptitle(title)
    fig.tight_layout()
    return fig

"""Claims of a study: each decided by a confidence interval of the paired difference, then Holm.

Claims are declared in the study file::

    claims:
      - claim: PTQ-QLoRA beats PTQ            # free text shown in the report
        a: ft_nf4_qlora                       # pipeline family on the left
        b: ft_nf4                             # ... and on the right
        metric: field_f1                      # a column of results.csv
        relation: ">"                         # ">" beats, ">=" not worse by more than min_effect, "==" within it
        min_effect: 0.02                      # optional: the smallest difference that counts

Verdict rule (docs/statistics.md). ``d = stat(a) - stat(b)`` on the pooled units (task examples
or perplexity windows) of all paired seeds, with a 95% t interval from a crossed seeds x examples
model (``ptqlib.report.inference``): the per-seed spread of the paired difference plus the example
component the seeds share, on each unit's influence value (delta method), so means,
micro-averaged ratios and exp(mean NLL) are handled alike; Satterthwaite degrees of freedom.
Seeds pair by value; a pipeline that does not train (one run) pairs with every seed of the other.
Metrics without units (size, speed, training loss) get a t interval over the per-seed
differences. A claim where a pipeline trains needs >= 3 paired seeds to be decided. With
``m = min_effect`` and the interval ``[lo, hi]`` of the signed difference (sign-flipped where lower
is better, so positive means "a is better"):

- ``>``: holds if ``lo > m``, does not hold if ``hi < m``;
- ``>=``: holds if ``lo > -m``, does not hold if ``hi < -m`` (not worse by more than m);
- ``==``: holds if ``-m < lo`` and ``hi < m`` (equivalence), does not hold if ``lo > m`` or ``hi < -m``;

and undecided otherwise: the interval contains the boundary, so the data cannot tell. Each
decidable claim also gets the one-sided p-value of "holds" (the same test: p < 0.025 exactly when
the interval says holds), Holm-adjusted over the study's claims (``verdict_holm``), and a flag
when a pipeline sits at the floor or ceiling of a bounded metric. Closed form: reproducible.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ptqlib import relations
from ptqlib.metrics import Statistic, bounded, lower_is_better, statistic
from ptqlib.report.cells import per_cell
from ptqlib.report.inference import holm, p_fails, p_holds, paired_interval

MIN_SEEDS = 3  # paired seeds a claim on trained pipelines needs: fewer leave the seed variance unknown
HOLM_ALPHA = 0.025  # one-sided, the level of each bound of the 95% interval (see docs/statistics.md)
FLOOR, CEILING = 0.05, 0.98


@dataclass
class Claim:
    claim: str
    a: str
    b: str
    metric: str
    relation: str = ">"
    min_effect: float = 0.0
    ref: str = ""  # a recovered-fraction claim: (a - b) / (ref - b) > min_effect (ptqlib.report.recovered)
    exploratory: bool = False  # decided and shown, outside the study's Holm family (declared so in the study file)


def _runs(results: pd.DataFrame, family: str) -> pd.DataFrame:
    df = results[results["status"] == "ok"] if "status" in results else results
    return df[df["family"] == family]


def _seed_pairs(ra: pd.DataFrame, rb: pd.DataFrame) -> list[tuple[int, int]]:
    """Seeds to compare (seed of a, seed of b): equal seeds, or a single run against each seed."""
    sa, sb = sorted(set(ra["seed"])), sorted(set(rb["seed"]))
    if len(sa) == 1 and len(sb) > 1 and len(ra) == 1:
        return [(sa[0], s) for s in sb]
    if len(sb) == 1 and len(sa) > 1 and len(rb) == 1:
        return [(s, sb[0]) for s in sa]
    if len(sa) == len(sb) == 1:
        return [(sa[0], sb[0])]
    return [(s, s) for s in sa if s in sb]


def _unit_arrays(units: pd.DataFrame, family: str, seeds: list[int], st: Statistic) -> tuple[np.ndarray, np.ndarray]:
    """(num, den), each (n_seeds, n_clusters), of one family's units for ``seeds`` in order.

    A cluster is a unit, or all the units of one document where the units carry a ``doc`` (perplexity
    windows at random positions, ``text.held_out_windows``: windows of one topic / module are not
    independent). Summing num and den inside a cluster leaves the statistic (a ratio of sums) as it
    is; the interval then treats documents, not windows, as the independent draws.
    """
    sub = units[(units["family"] == family) & (units["group"] == st.group)]
    nums, dens = [], []
    for s in seeds:
        at_seed = sub[sub["seed"] == s]
        # a seed's calibration draws (``draws: K``, pipelines <name>[seed=s,draw=k]): their units averaged, so
        # the seed is the replicate and a draw's spread enters the seed part (the nested design)
        runs = [g.sort_values("unit") for _, g in at_seed.groupby("pipeline", sort=True)] if "pipeline" in at_seed \
            else [at_seed.sort_values("unit")]
        runs = runs or [at_seed]
        rows = runs[0]
        num = np.mean([r[st.num].to_numpy(float) for r in runs], axis=0)
        den = (np.mean([r[st.den].to_numpy(float) for r in runs], axis=0) if st.den else np.ones(len(rows)))
        if "doc" in rows and (pd.to_numeric(rows["doc"], errors="coerce") >= 0).any():
            doc = pd.to_numeric(rows["doc"], errors="coerce").fillna(-1).to_numpy()
            key = np.where(doc >= 0, doc, -1.0 - rows["unit"].to_numpy(float))  # no document: its own cluster
            order, inv = np.unique(key, return_inverse=True)
            num, den = np.bincount(inv, num, len(order)), np.bincount(inv, den, len(order))
        nums.append(num)
        dens.append(den)
    return np.stack(nums), np.stack(dens)


def paired_bootstrap(num_a: np.ndarray, den_a: np.ndarray, num_b: np.ndarray, den_b: np.ndarray, st: Statistic,
                     n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """(difference, lo, hi): ``st(a) - st(b)`` on all units and its paired hierarchical bootstrap interval.

    Inputs are (S, N): S paired seeds (row i of a with row i of b), N paired units. Each replicate
    draws S seeds and then N units with replacement, one draw shared by a and b; the statistic is
    recomputed from the drawn units' pooled sums (``transform(sum num / sum den)``).

    Superseded for claims by :func:`ptqlib.report.inference.paired_interval`: with 2-5 seeds resampling
    them under-states the seed variance (the interval under-covers, tests/report/test_coverage.py); kept
    to compare with.
    """
    rng = np.random.default_rng(seed)
    S, N = num_a.shape
    ws = rng.multinomial(S, np.full(S, 1 / S), size=n_boot).astype(float)  # (B, S) seed counts
    we = rng.multinomial(N, np.full(N, 1 / N), size=n_boot).astype(float)  # (B, N) unit counts

    def stat(num, den, w_s, w_e):
        ratio = np.einsum("bs,sn,bn->b", w_s, num, w_e) / np.einsum("bs,sn,bn->b", w_s, den, w_e)
        return np.exp(ratio) if st.exp else ratio

    one_s, one_e = np.ones((1, S)), np.ones((1, N))
    d = float(stat(num_a, den_a, one_s, one_e)[0] - stat(num_b, den_b, one_s, one_e)[0])
    with np.errstate(invalid="ignore", divide="ignore"):
        reps = stat(num_a, den_a, ws, we) - stat(num_b, den_b, ws, we)
    reps = reps[np.isfinite(reps)]
    if not len(reps):
        return d, math.nan, math.nan
    alpha = (1 - level) / 2
    lo, hi = np.quantile(reps, [alpha, 1 - alpha])
    return d, float(lo), float(hi)


def decide(relation: str, lo: float, hi: float, min_effect: float = 0.0) -> str:
    """holds / does not hold / undecided from the interval of the signed difference (``ptqlib.relations``)."""
    return relations.relation(relation).decide(lo, hi, min_effect)


def hypothesis(claim: Claim) -> str:
    """What "holds" accepts, in words, on the signed difference: e.g. ``a - b > -0.02 (not worse by
    more than 0.02)``; where lower is better the difference is b - a. A recovered-fraction claim: on the fraction."""
    if claim.ref:
        return f"({claim.a} - {claim.b}) / ({claim.ref} - {claim.b}) > {claim.min_effect:g} (the share of the loss recovered)"
    rel, lower = relations.relation(claim.relation), lower_is_better(claim.metric)
    d = f"{claim.b} - {claim.a}" if lower else f"{claim.a} - {claim.b}"
    text, notes = rel.words(d, claim.a, claim.b, claim.min_effect)
    lo, hi = rel.bounds(1.0)
    notes += ["lower is better"] if lower and lo != -hi else []  # a symmetric relation has no direction
    return text + (f" ({'; '.join(notes)})" if notes else "")


def _seed_sd(runs: pd.DataFrame, metric: str) -> float:
    v = pd.to_numeric(runs[metric], errors="coerce").dropna() if metric in runs else pd.Series(dtype=float)
    return float(v.std(ddof=1)) if len(v) > 1 else 0.0


def _trains(runs: pd.DataFrame) -> bool:
    return "stages" in runs and runs["stages"].astype(str).str.contains("finetune").any()


def _paired(claim: Claim, results: pd.DataFrame, units: pd.DataFrame | None, ra: pd.DataFrame, rb: pd.DataFrame,
            pairs: list[tuple[int, int]]) -> tuple | str:
    """(num_a, den_a, num_b, den_b, statistic), each array (seeds, units), or why there is nothing to pair.

    A run-level metric (no units) is one unit per run: the statistic is then the mean over seeds.
    """
    sa, sb = [p[0] for p in pairs], [p[1] for p in pairs]
    st = statistic(claim.metric)
    have_units = (st is not None and units is not None and len(units) and st.num in units
                  and {claim.a, claim.b} <= set(units.loc[units["group"] == st.group, "family"]))
    if have_units:
        num_a, den_a = _unit_arrays(units, claim.a, sa, st)
        num_b, den_b = _unit_arrays(units, claim.b, sb, st)
        if num_a.shape != num_b.shape:
            return f"undecided (unpaired units: {num_a.shape} vs {num_b.shape})"
        return num_a, den_a, num_b, den_b, st

    def col(runs, seeds):  # a seed's draws averaged
        v = pd.to_numeric(runs[claim.metric], errors="coerce").groupby(runs["seed"]).mean()
        return v.reindex(seeds).to_numpy(float)[:, None]

    num_a, num_b = col(ra, sa), col(rb, sb)
    if np.isnan(num_a).any() or np.isnan(num_b).any():
        return "undecided (no data)"
    return num_a, np.ones_like(num_a), num_b, np.ones_like(num_b), Statistic("run", "value")


def verdict(claim: Claim, results: pd.DataFrame, units: pd.DataFrame | None = None) -> dict:
    """The difference a - b, its 95% interval (``ptqlib.report.inference``), the seed spread, the verdict and
    the p-value of "holds" (NaN where the claim cannot be decided); with ``ref``, the recovered fraction
    (:func:`_recovered`) in the difference's columns."""
    ra, rb = _runs(results, claim.a), _runs(results, claim.b)
    row: dict = {"claim": claim.claim, "a": claim.a, "b": claim.b, "metric": claim.metric, "relation": claim.relation,
                 "min_effect": claim.min_effect, "tested": hypothesis(claim)}
    nan = math.nan
    row.update(mean_a=nan, mean_b=nan, difference=nan, ci_low=nan, ci_high=nan, se=nan, df=nan,
               seed_sd=max(_seed_sd(ra, claim.metric), _seed_sd(rb, claim.metric)), n_seeds=0, n_examples=0,
               verdict="", p_holds=nan, p_fails=nan)
    for fam, runs in ((claim.a, ra), (claim.b, rb)):
        if runs.duplicated(["seed", "grid.draw"] if "grid.draw" in runs else ["seed"]).any():
            row["verdict"] = f"undecided ({fam} has a grid: claims compare one grid point, make it its own pipeline)"
            return row
    pairs = _seed_pairs(ra, rb) if len(ra) and len(rb) else []
    data = _paired(claim, results, units, ra, rb, pairs) if pairs and claim.metric in results else "undecided (no data)"
    if isinstance(data, str):
        row["verdict"] = data
        return row
    num_a, den_a, num_b, den_b, st = data
    if claim.ref:
        return _recovered(claim, row, results, units, ra, rb, pairs, data)
    trains = _trains(ra) or _trains(rb)
    # one run of pipelines that do not train is the whole distribution of a run-level number
    iv = paired_interval(num_a, den_a, num_b, den_b, st, exact=not trains and num_a.size == 1)
    row.update(n_seeds=len(pairs), n_examples=num_a.shape[1] if st.group != "run" else 0,
               mean_a=st(num_a.ravel(), den_a.ravel()), mean_b=st(num_b.ravel(), den_b.ravel()),
               difference=float(iv.difference), ci_low=float(iv.lo), ci_high=float(iv.hi), se=float(iv.se),
               df=float(iv.df))
    if trains and len(pairs) < MIN_SEEDS:
        row["verdict"] = f"undecided (needs >= {MIN_SEEDS} seeds; has {len(pairs)})"
        return row
    sign = -1.0 if lower_is_better(claim.metric) else 1.0
    slo, shi = sorted((sign * row["ci_low"], sign * row["ci_high"]))
    row["verdict"] = decide(claim.relation, slo, shi, claim.min_effect)
    row["p_holds"] = p_holds(claim.relation, sign * row["difference"], row["se"], row["df"], claim.min_effect)
    row["p_fails"] = p_fails(claim.relation, sign * row["difference"], row["se"], row["df"], claim.min_effect)
    return row


def ref_units(claim: Claim, results: pd.DataFrame, units, ra, rb, pairs) -> tuple | str:
    """A recovered-fraction claim's reference: ``(num, den, its runs)`` paired as a's seeds (a reference that does
    not train: its one run with every seed), or why there is none (an undecided verdict)."""
    rr = _runs(results, claim.ref)
    by_a = dict(_seed_pairs(ra, rr)) if len(rr) else {}
    kept = [(by_a[sa], sb) for sa, sb in pairs if sa in by_a]
    if not kept:
        return "undecided (no ref data)"
    if len(kept) != len(pairs):
        return "undecided (ref lacks some of the paired seeds)"
    data = _paired(Claim(claim.claim, claim.ref, claim.b, claim.metric), results, units, rr, rb, kept)
    return data if isinstance(data, str) else (data[0], data[1], rr)


def _recovered(claim: Claim, row: dict, results: pd.DataFrame, units, ra, rb, pairs, data) -> dict:
    """A recovered-fraction claim's row: ``difference`` is ``(a - b) / (ref - b)`` with its Fieller interval,
    ``se`` / ``df`` the delta method's, and the p-values the t tests of ``(a - b) - m (ref - b)``; the ref runs
    pair with a's seeds (a ref that does not train: its one run with every seed)."""
    from ptqlib.report.recovered import p_recovers, recovered_interval

    data_r = ref_units(claim, results, units, ra, rb, pairs)
    if isinstance(data_r, str):
        row["verdict"] = data_r
        return row
    num_a, den_a, num_b, den_b, st = data
    a, b, r, rr = (num_a, den_a), (num_b, den_b), (data_r[0], data_r[1]), data_r[2]
    sign = -1.0 if lower_is_better(claim.metric) else 1.0
    iv = recovered_interval(a, b, r, st, sign)
    row.update(ref=claim.ref, mean_ref=st(r[0].ravel(), r[1].ravel()), n_seeds=len(pairs),
               n_examples=num_a.shape[1] if st.group != "run" else 0, mean_a=st(num_a.ravel(), den_a.ravel()),
               mean_b=st(num_b.ravel(), den_b.ravel()), difference=iv.fraction, ci_low=iv.lo, ci_high=iv.hi,
               se=iv.se, df=iv.df)
    trains = _trains(ra) or _trains(rb) or _trains(rr)
    if trains and len(pairs) < MIN_SEEDS:
        row["verdict"] = f"undecided (needs >= {MIN_SEEDS} seeds; has {len(pairs)})"
    elif not iv.loss > 0:
        row["verdict"] = f"undecided ({claim.ref} is not better than {claim.b}: no loss to recover)"
    else:
        row["verdict"] = decide(claim.relation, iv.lo, iv.hi, claim.min_effect)
        row["p_holds"], row["p_fails"] = p_recovers(a, b, r, st, claim.min_effect, sign)
    return row


def flags(row: dict) -> str:
    """Pipelines whose mean of a bounded metric is < FLOOR or > CEILING, e.g. ``b at floor (field_f1 0.000)``:
    there a difference says little (no room to move) and the t interval's normal approximation is poor."""
    name = str(row["metric"]).rsplit(".", 1)[-1]
    if not bounded(name):
        return ""
    out = []
    for side in ("a", "b"):
        v = row[f"mean_{side}"]
        if v < FLOOR or v > CEILING:
            out.append(f"{side} at {'floor' if v < FLOOR else 'ceiling'} ({name} {v:.3f})")
    return "; ".join(out)


def check_claims(claims: list[dict], results: pd.DataFrame, units: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per claim (see :func:`verdict`), or per claim and cell in a study over several models or tasks
    (``cells.per_cell``: a ``cell`` column), with Holm's adjustment over the rows (one study's, the family) in
    both directions, and the floor / ceiling flags. A claim declared ``exploratory`` is decided and shown but
    left out of the family: its ``verdict_holm`` says so, and it makes no other claim's adjustment stricter.

    Each tested claim enters Holm once, with the p-value of the direction its data favour,
    ``min(p_holds, p_fails)``; ``p_holm`` is that p-value adjusted. ``verdict_holm`` is "holds" or "does not
    hold" (the favoured direction) where ``p_holm < HOLM_ALPHA``, "undecided (after Holm)" where only the
    unadjusted verdict decided, and the unadjusted undecided verdict otherwise. Adjusting "holds" alone let
    four of the five "does not hold" verdicts of the committed studies stand on unadjusted p-values."""
    rows = [{"claim": c["claim"], **({"cell": cell} if cell else {}), **verdict(Claim(**c), res, un),
             **({"exploratory": True} if c.get("exploratory") else {})}
            for c in claims for cell, res, un in per_cell(results, units, [c["a"], c["b"], c.get("ref")])]
    # NaN where not tested, or exploratory: outside the family, so it neither is adjusted nor widens the others
    favoured = [math.nan if r.get("exploratory") else min(r["p_holds"], r["p_fails"]) for r in rows]
    for row, adjusted in zip(rows, holm(favoured)):
        row["p_holm"] = adjusted
        if row.get("exploratory"):
            row["verdict_holm"] = f"{row['verdict']} (exploratory: outside Holm)"
        elif adjusted < HOLM_ALPHA:  # NaN compares False: a claim not tested is never decided
            row["verdict_holm"] = "holds" if row["p_holds"] <= row["p_fails"] else "does not hold"
        elif row["verdict"] in ("holds", "does not hold"):
            row["verdict_holm"] = "undecided (after Holm)"
        else:
            row["verdict_holm"] = row["verdict"]
        row["flags"] = flags(row)
    return pd.DataFrame(rows)

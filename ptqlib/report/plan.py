"""How many seeds would decide each claim, and what they cost: ``python -m ptqlib plan STUDY``.

From a study's recorded units (``reports/<study>/units.csv``, ``results.csv``) each claim's paired
influence differences ``D[s, i]`` give the crossed model's variance components (docs/statistics.md)::

    sigma_seed^2         from the per-seed means: var_s(D[s, .]) - MS_e / N   (training randomness)
    sigma_example^2      (MS_examples - MS_e) / S                              (shared by every seed)
    sigma_interaction^2  MS_e

If the difference stayed at its estimate, the interval at S seeds would have
``se^2 = sigma_seed^2 / S + sigma_example^2 / N + sigma_interaction^2 / (S N)`` with Satterthwaite's df
(S - 1 for the seed part, ``n_eff - 1`` for the units), and the claim would be decided at the first S
whose interval clears the boundary. The example part does not shrink with seeds: where it alone keeps
the interval across the boundary, no number of seeds decides the claim (more examples might, or an
equivalence restatement with a margin). The cost of a seed is the recorded wall time of the stages
one more seed of a and b runs (a stage both pipelines share counted once), from ``results.csv``
and the study's stage graph.

Pipelines that do not train are one run each (deterministic given their input): seeds do not apply.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from ptqlib.metrics import lower_is_better
from ptqlib.report.cells import labelled, per_cell
from ptqlib.report.claims import MIN_SEEDS, Claim, _paired, _runs, _seed_pairs, _trains, decide, ref_units
from ptqlib.report.inference import LEVEL, effective_units, influence

MAX_SEEDS = 200  # beyond this a claim counts as not decidable by seeds

COLUMNS = ["claim", "metric", "relation", "min_effect", "difference", "n_seeds", "n_units", "n_eff",
           "sigma_seed", "sigma_example", "sigma_interaction", "seed_share", "verdict_now", "seeds_needed",
           "extra_seeds", "seed_cpu_s", "extra_cpu_h", "note"]


def variance_components(d: np.ndarray) -> tuple[float, float, float]:
    """(sigma_seed^2, sigma_example^2, sigma_interaction^2) of paired differences ``d`` (S, N), each >= 0.
    One seed: the seed part is not estimable (NaN) and the interaction is not separable from the example
    part (all of it counted as example)."""
    S, N = d.shape
    if S == 1:
        return math.nan, float(d[0].var(ddof=1)) if N > 1 else 0.0, 0.0
    seed_means, ex_means = d.mean(1), d.mean(0)
    if N == 1:
        return float(seed_means.var(ddof=1)), 0.0, 0.0
    resid = d - seed_means[:, None] - ex_means[None, :] + d.mean()
    ms_e = float((resid ** 2).sum() / ((S - 1) * (N - 1)))
    ms_b = float(S * ex_means.var(ddof=1))
    return max(float(seed_means.var(ddof=1)) - ms_e / N, 0.0), max(ms_b - ms_e, 0.0) / S, ms_e


def projected(comp: tuple[float, float, float], S: int, N: int, n_eff: float) -> tuple[float, float]:
    """(se, df) of the interval at S seeds of N units (``n_eff`` effective), the components as estimated."""
    va, vb, ve = (0.0 if math.isnan(c) else c for c in comp)
    seed = va / S + ve / (S * N)
    example = vb / N
    dfn = max(n_eff - 1.0, 1.0)
    ms_b, ms_e = ve + S * vb, ve  # expected mean squares at S seeds
    spread = (seed ** 2 / (S - 1) if S > 1 else 0.0) + (
        (ms_b / (S * N)) ** 2 / dfn + ((ms_e / (S * N)) ** 2 / ((S - 1) * dfn) if S > 1 else 0.0) if example > 0 else 0.0)
    se = math.sqrt(seed + example)
    return se, ((seed + example) ** 2 / spread if spread > 0 else math.inf)


def seeds_needed(signed: float, comp, N: int, n_eff: float, relation: str, min_effect: float) -> int | None:
    """The fewest seeds (>= MIN_SEEDS) at which the interval around ``signed`` (the difference, sign-flipped
    where lower is better) decides the claim; None if no number up to MAX_SEEDS does."""
    for S in range(MIN_SEEDS, MAX_SEEDS + 1):
        se, df = projected(comp, S, N, n_eff)
        half = stats.t.ppf(0.5 + LEVEL / 2, df) * se if se > 0 else 0.0
        if not decide(relation, signed - half, signed + half, min_effect).startswith("undecided"):
            return S
    return None


def stage_costs(results: pd.DataFrame, chains: dict[str, list[str]], kinds: dict[str, str]) -> dict[str, float]:
    """Recorded wall seconds per stage id: a pipeline row's ``wall_s.<kind>[n]`` columns are its chain's
    stages in order (``report.tables``: finetune, finetune2, ...)."""
    cost: dict[str, float] = {}
    for row in results.to_dict("records"):
        chain = chains.get(str(row.get("pipeline")), [])
        seen: dict[str, int] = {}
        for sid in chain:
            kind = kinds[sid]
            seen[kind] = seen.get(kind, 0) + 1
            col = "wall_s." + kind + (str(seen[kind]) if seen[kind] > 1 else "")
            v = pd.to_numeric(pd.Series([row.get(col)]), errors="coerce").iloc[0]
            if not pd.isna(v):
                cost[sid] = float(v)
    return cost


def _seed_cost(claim: Claim, results: pd.DataFrame, chains: dict[str, list[str]], cost: dict[str, float]) -> float:
    """Median over the recorded seeds of the wall seconds of one seed of a and b (shared stages once): a stage
    slowed by other work on the cores, or paused, sets no seed's cost."""
    per_seed = []
    for s in sorted(set(_runs(results, claim.a)["seed"]) | set(_runs(results, claim.b)["seed"])):
        ids: set[str] = set()
        for fam in (claim.a, claim.b):
            runs = _runs(results, fam)
            if _trains(runs):  # a pipeline that does not train runs once, not once per seed
                for name in runs.loc[runs["seed"] == s, "pipeline"]:
                    ids |= set(chains.get(str(name), []))
        if ids:
            per_seed.append(sum(cost.get(i, 0.0) for i in sorted(ids)))  # sorted: a set's order moves with the hash seed
    return float(np.median(per_seed)) if per_seed else math.nan


def plan_claims(claims: list[dict], results: pd.DataFrame, units: pd.DataFrame | None,
                chains: dict[str, list[str]] | None = None, kinds: dict[str, str] | None = None) -> pd.DataFrame:
    """One row per claim (per claim and cell over several models or tasks, ``cells.per_cell``: the claim's text
    then carries its cell): its variance components, the seeds that would decide it, and their CPU time."""
    cost = stage_costs(results, chains or {}, kinds or {}) if chains else {}
    rows = []
    for c in claims:
        for cell, res, un in per_cell(results, units, [c["a"], c["b"], c.get("ref")]):
            row = _plan_row(Claim(**c), res, un, chains or {}, cost)
            rows.append({**row, "claim": labelled(row["claim"], cell)})
    return pd.DataFrame(rows, columns=COLUMNS)


def _plan_row(claim: Claim, results: pd.DataFrame, units: pd.DataFrame | None, chains: dict, cost: dict) -> dict:
    row: dict = {k: math.nan for k in COLUMNS} | {"claim": claim.claim, "metric": claim.metric,
                                                      "relation": claim.relation, "min_effect": claim.min_effect,
                                                      "note": ""}
    ra, rb = _runs(results, claim.a), _runs(results, claim.b)
    pairs = _seed_pairs(ra, rb) if len(ra) and len(rb) else []
    data = _paired(claim, results, units, ra, rb, pairs) if pairs and claim.metric in results else "no data"
    if isinstance(data, str):
        return row | {"note": data}
    num_a, den_a, num_b, den_b, st = data
    va, pa = influence(num_a, den_a, st)
    vb, pb = influence(num_b, den_b, st)
    d, diff = pa - pb, float(va - vb)
    rel, margin = claim.relation, claim.min_effect
    if claim.ref:  # "(a - b) / (ref - b) > m" is the contrast claim "(a - b) - m (ref - b) > 0" (report.recovered)
        ref = ref_units(claim, results, units, ra, rb, pairs)
        if isinstance(ref, str):
            return row | {"note": ref}
        vr, pr = influence(ref[0], ref[1], st)
        row["fraction"] = float(va - vb) / float(vr - vb) if float(vr - vb) else math.nan
        d, diff, rel, margin = d - claim.min_effect * (pr - pb), diff - claim.min_effect * float(vr - vb), ">", 0.0
    S, N = d.shape
    n_eff = float(effective_units((den_a + den_b).mean(0)))
    comp = variance_components(d)
    signed = (-1.0 if lower_is_better(claim.metric) else 1.0) * diff
    total = sum(0.0 if math.isnan(x) else x for x in (comp[0] / S, comp[1] / N, comp[2] / (S * N)))
    row.update(difference=row.pop("fraction", float(va - vb)), n_seeds=S, n_units=N, n_eff=n_eff,
               sigma_seed=math.sqrt(comp[0]) if not math.isnan(comp[0]) else math.nan,
               sigma_example=math.sqrt(comp[1]), sigma_interaction=math.sqrt(comp[2]),
               seed_share=(comp[0] / S + comp[2] / (S * N)) / total if total > 0 and not math.isnan(comp[0]) else math.nan)
    if not (_trains(ra) or _trains(rb)):
        return row | {"note": "pipelines that do not train: one run each, seeds do not change the interval"}
    if S < 2:
        return row | {"note": "one paired seed: the seed part is not estimable; run >= 2 seeds first"}
    se_now, df_now = projected(comp, S, N, n_eff)
    half = stats.t.ppf(0.5 + LEVEL / 2, df_now) * se_now
    row["verdict_now"] = decide(rel, signed - half, signed + half, margin) if S >= MIN_SEEDS \
        else f"undecided (needs >= {MIN_SEEDS} seeds; has {S})"
    need = seeds_needed(signed, comp, N, n_eff, rel, margin)
    row["seed_cpu_s"] = _seed_cost(claim, results, chains, cost) if chains else math.nan
    if need is None:
        return row | {"note": _why_undecidable(rel, margin, signed, comp, N)}
    row.update(seeds_needed=need, extra_seeds=max(need - S, 0))
    if not math.isnan(row["seed_cpu_s"]):
        row["extra_cpu_h"] = row["extra_seeds"] * row["seed_cpu_s"] / 3600
    return row


def _why_undecidable(relation: str, min_effect: float, signed: float, comp, N: int) -> str:
    """Why no number of seeds up to MAX_SEEDS decides the claim at its estimate."""
    floor = math.sqrt(comp[1] / N)  # the interval's se with infinitely many seeds
    z = stats.norm.ppf(0.5 + LEVEL / 2)
    if decide(relation, signed - z * floor, signed + z * floor, min_effect).startswith("undecided"):
        why = f"the example part alone (se {floor:.3g} at any number of seeds) keeps the interval across the boundary"
    else:
        boundary = min(abs(signed - b) for b in {min_effect, -min_effect})
        why = f"the estimate sits {boundary:.3g} from the boundary, within the interval of {MAX_SEEDS} seeds"
    return (f"no number of seeds up to {MAX_SEEDS} decides it at this estimate: {why}; "
            "more examples, or an equivalence claim with a stated margin")


def plan_study(study, reports: str | Path, reporter) -> pd.DataFrame:
    """The plan of a loaded study (``study.schema.load_study``) from ``reports/<study>/``; writes ``plan.csv``.
    ``reporter`` (``ptqlib.report.tables``) reads the report's selection choices, so the chains are as run, with
    ``precision: auto`` resolved as on the machine that made the report (``previous.auto_elsewhere``)."""
    import tempfile

    from ptqlib import precision
    from ptqlib.engine.runner import Runner
    from ptqlib.report.analysis import load_outputs
    from ptqlib.report.previous import auto_elsewhere
    from ptqlib.study.schema import load_study

    out_dir = Path(reports) / study.name
    if not (out_dir / "results.csv").exists():
        raise FileNotFoundError(f"{out_dir / 'results.csv'}: no recorded runs to plan from; run the study first "
                                f"(python -m ptqlib run parameters/{study.name}.yaml)")
    out = load_outputs(out_dir)
    with tempfile.TemporaryDirectory() as runs:  # the chains as run: selections read from selection.csv
        runner = Runner(study, runs, reports, reporter=reporter)
        if found := auto_elsewhere(study, runner):  # made where `auto` resolved otherwise: its ids, its costs
            with precision.auto_as(found[0]):
                runner = Runner(load_study(study.path, allow_network=False), runs, reports, reporter=reporter)
        chains, kinds = runner.chains, {sid: n.kind for sid, n in runner.nodes.items()}
    claims = [dict(c) for c in (out.meta.get("claims") or [])]
    if not claims:
        raise ValueError(f"{out_dir}: study.json declares no claims; nothing to plan")
    table = plan_claims(claims, out.results, out.units, chains, kinds)
    table.to_csv(out_dir / "plan.csv", index=False)
    return table


def describe(table: pd.DataFrame) -> str:
    """The plan as text, one line per claim."""
    lines = []
    for r in table.itertuples():
        head = f"- {r.claim} [{r.metric}]: d = {r.difference:+.4g}" if not pd.isna(r.difference) else f"- {r.claim}"
        if not pd.isna(r.seed_share):
            head += (f"; sigma seed {r.sigma_seed:.3g}, example {r.sigma_example:.3g}, interaction "
                     f"{r.sigma_interaction:.3g} (seed part {100 * r.seed_share:.0f}% of the variance at {r.n_seeds} seeds)")
        if not pd.isna(r.seeds_needed):
            cost = f", {r.extra_cpu_h:.1f} CPU h more" if not pd.isna(r.extra_cpu_h) else ""
            head += f"; decided at {int(r.seeds_needed)} seeds ({int(r.extra_seeds)} more{cost})"
        if r.note:
            head += f"; {r.note}"
        lines.append(head)
    return "\n".join(lines)

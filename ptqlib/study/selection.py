"""Choosing a finetune setting on the task's validation split: ``{select: [...], metric: ...}``.

A study file may give one finetune setting per pipeline as candidates (in the stage, or in
``defaults.finetune`` for every pipeline, so every method gets the same budget)::

    ft16: [{finetune: {method: full, lr: {select: [1.0e-4, 3.0e-4, 1.0e-3], metric: field_f1}}}]

``study.schema.load_study`` expands such a family into one *selection pipeline* per candidate (family
``ft16~select``, name ``ft16~select[lr=0.0003]``): the study's first seed, its evaluate stage
scoring the validation split (``split: validation``, its other settings as the family's). The
family's test-set pipelines (every seed, the test split, the setting left out of their names) are
built for every candidate in ``Selection.options``; :func:`resolve` adds the best candidate's to
the study once every selection pipeline has recorded the metric: higher is better unless
``metrics.lower_is_better(metric)``, ties go to the first listed, NaN ranks last. A declared tie
rule, ``tie: m`` in the select, counts every candidate within ``m`` of the best (in the metric's
units) as tied with it, and the first listed of them wins: one training run per candidate cannot
tell apart candidates closer than its seed noise, so the study file says in advance which it prefers
(the order of ``select``) instead of letting that noise pick. Each grid point
(and model) selects on its own. The runner runs the selection pipelines first when the choice is
not known yet, then the rest (``Runner._run``); cached, the choice is read at start-up. Selection
pipelines are no rows of ``results.csv`` (claims compare test-set runs only): ``selection.csv``
(``report.write_selection``) shows them.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from fnmatch import fnmatch
from typing import TYPE_CHECKING, Callable

from ptqlib.metrics import evaluate_metric_names, known_evaluate_metric, lower_is_better
from ptqlib.metrics import metric as registered

if TYPE_CHECKING:
    from ptqlib.study.pipeline import Pipeline, Study

SUFFIX = "~select"  # a selection pipeline's family is <family>~select ('~' is refused in study pipeline names)
metric_names = evaluate_metric_names  # what a select can rank by: what the evaluate stage records
known_metric = known_evaluate_metric


def missing_metric(metric: str, ev: dict) -> str | None:
    """Why an evaluate stage with params ``ev`` records no ``metric`` (None: it records it), from the
    metric's ``needs`` in the registry (``ptqlib.metrics``)."""
    if metric.startswith("lmeval."):
        if not ev["lm_eval_tasks"]:
            return "its lm_eval_tasks is empty"
        if metric.split(".")[1] not in ev["lm_eval_tasks"]:
            return f"its lm_eval_tasks {ev['lm_eval_tasks']} lack {metric.split('.')[1]!r}"
        return None
    m = registered(metric)
    needs = m.needs if m else ""
    if needs == "task" and not ev["task_samples"]:
        return "its task_samples is 0 (no generation)"
    if needs in ("ppl", "kl") and m.source and m.source not in ev["ppl_sources"]:
        return f"its ppl_sources {ev['ppl_sources']} lack {m.source!r}"
    if needs == "kl" and not ev.get("kl_reference"):
        return ("it compares with no 16-bit reference (nothing in the pipeline quantizes, or its kl_reference "
                "is off)")
    if needs == "speed" and not ev["speed_prompts"]:
        return "its speed_prompts is 0"
    if needs == "llama.cpp" and ev["runtime"] != "llama.cpp":
        return f"its runtime is {ev['runtime']!r} (llama.cpp only)"
    return None


@dataclass
class Selection:
    """One family's choice of ``key`` at one grid point (``point``: the other grid values, the model)."""

    family: str  # the pipeline's name in the study file
    key: str  # the finetune setting chosen
    stage: int  # the index of its finetune stage in the family's chain
    candidates: list  # in the study file's order (a tie goes to the first)
    metric: str
    point: dict  # the other grid values this choice is for ({} without a grid)
    tie: float = 0.0  # candidates within this of the best (metric units) are tied: the first listed wins
    pipelines: list[str] = field(default_factory=list)  # the selection pipelines, one per candidate
    options: list[list["Pipeline"]] = field(default_factory=list)  # per candidate: the test-set pipelines, all seeds
    values: list[float | None] | None = None  # the metric on the validation split, per candidate (None: not recorded)
    chosen: int | None = None  # index into candidates, once every value is recorded

    def where(self) -> str:
        return self.family + suffix(self.point)


def is_selection(pl: "Pipeline") -> bool:
    return pl.family.endswith(SUFFIX)


def suffix(label: dict) -> str:
    return "[" + ",".join(f"{k}={v}" for k, v in label.items()) + "]" if label else ""


def validation_params(ev: dict, metric: str) -> dict:
    """A selection pipeline's evaluate settings: the family's ``ev`` on the validation split, measuring
    only what ranks the candidates (a task statistic: no perplexity or KL; a perplexity or KL metric:
    that source's windows only, no generation), so choosing costs one short evaluation per candidate."""
    out = {**ev, "split": "validation", "speed_prompts": 0, "lm_eval_tasks": []}
    m = registered(metric)
    if m and m.needs == "task" and m.statistic:
        return {**out, "ppl_sources": [], "kl_reference": False}
    if m and m.needs in ("ppl", "kl") and m.statistic:
        return {**out, "ppl_sources": [m.source], "task_samples": 0, "kl_reference": m.needs == "kl"}
    return {**ev, "split": "validation"}  # a run metric (size, speed) or lm-eval: measured as the family does


def split_family(pipelines: list["Pipeline"], stage: int, key: str, candidates: list, metric: str,
                 first_seed: int, test_seeds: set | None = None,
                 tie: float = 0.0) -> tuple[list["Pipeline"], list[Selection]]:
    """A family expanded with its candidates as the grid axis ``key`` -> (its selection pipelines,
    its selections). A test-set pipeline loses ``key`` from its name and grid; a selection pipeline
    (``first_seed``'s: the study's first seed, or its ``selection_seed``) loses the seed and scores the
    validation split. ``test_seeds``: the seeds of the test-set pipelines (all, when None); a selection
    seed outside them trains the candidates on a draw no test pipeline uses; ``tie``: the declared tie margin."""
    sels: dict[tuple, Selection] = {}
    selection_pls: dict[str, "Pipeline"] = {}
    for pl in pipelines:
        ci = next(i for i, c in enumerate(candidates) if c == pl.grid[key])  # candidates are distinct (load_study)
        # seeds and calibration draws are replicates: one choice for all of them (made at the first seed's draw 0)
        point = {k: v for k, v in pl.grid.items() if k not in (key, "seed", "draw")}
        sel = sels.setdefault((pl.model, repr(point)), Selection(
            pl.family, key, stage, list(candidates), metric, point, tie, pipelines=[""] * len(candidates),
            options=[[] for _ in candidates]))
        rest = {k: v for k, v in pl.grid.items() if k != key}
        if test_seeds is None or pl.seed in test_seeds:
            sel.options[ci].append(dataclasses.replace(pl, name=pl.family + suffix(rest), grid=rest))
        if pl.seed == first_seed and not pl.grid.get("draw"):
            grid = {k: v for k, v in pl.grid.items() if k not in ("seed", "draw")}
            ev = pl.stages[-1]
            stages = pl.stages[:-1] + [dataclasses.replace(ev, params=validation_params(ev.params, metric))]
            name = pl.family + SUFFIX + suffix(grid)
            sel.pipelines[ci] = name
            selection_pls[name] = dataclasses.replace(pl, name=name, family=pl.family + SUFFIX, grid=grid,
                                                      stages=stages)
    # grouped by grid point, in candidate order
    return [selection_pls[n] for s in sels.values() for n in s.pipelines], list(sels.values())


def gaps(values: list[float], metric: str) -> list[float]:
    """How far each candidate's value falls short of the best one's (>= 0; NaN for a NaN value)."""
    sign = -1.0 if lower_is_better(metric) else 1.0
    known = [sign * v for v in values if not math.isnan(v)]
    return [math.nan if math.isnan(v) else max(known) - sign * v for v in values]


def tied(gap: float, tie: float) -> bool:
    """Is a candidate ``gap`` short of the best within the margin ``tie``? (1e-9 of slack: 0.60 - 0.58 is
    0.020000000000000018 in floats, and a margin of 0.02 means it is tied)."""
    return gap <= tie + 1e-9 * max(1.0, tie)


def choose(values: list[float | None], metric: str, tie: float = 0.0) -> int | None:
    """The best candidate's index: None until every value is known; higher is better unless
    ``metrics.lower_is_better(metric)``; NaN ranks last (all NaN: the first); the first listed of the
    candidates within ``tie`` of the best wins (``tie`` 0: exact ties only)."""
    if any(v is None for v in values):
        return None
    if all(math.isnan(v) for v in values):
        return 0
    return next(i for i, g in enumerate(gaps(values, metric)) if tied(g, tie))


def resolve(study: "Study", value_of: Callable[[str, str], float | None]) -> "Study":
    """``study`` with each open selection's values read (``value_of(pipeline, metric)``) and, where
    all are known, the chosen candidate's test-set pipelines placed after its selection pipelines.
    Returns a new Study; ``study`` is left as it is."""
    pls = list(study.pipelines)
    sels = []
    for sel in study.selections:
        if sel.chosen is None:
            values = [value_of(name, sel.metric) for name in sel.pipelines]
            sel = dataclasses.replace(sel, values=values, chosen=choose(values, sel.metric, sel.tie))
            if sel.chosen is not None:
                names = [p.name for p in pls]
                at = max(names.index(n) for n in sel.pipelines) + 1
                pls[at:at] = sel.options[sel.chosen]
        sels.append(sel)
    return dataclasses.replace(study, pipelines=pls, selections=sels)


def matches(sel: Selection, patterns: list[str] | None) -> bool:
    """Does ``--only patterns`` ask for this selection's family (its test-set or selection pipelines)?"""
    if not patterns:
        return True
    names = [sel.family, sel.family + SUFFIX, *sel.pipelines, *(p.name for o in sel.options for p in o)]
    return any(n == pat or fnmatch(n, pat) for pat in patterns for n in names)


def waiting(study: "Study", only: list[str] | None = None) -> list[str]:
    """The selection pipelines to run before the rest: those of the open selections ``only`` asks for."""
    return [n for s in study.selections if s.chosen is None and matches(s, only) for n in s.pipelines]


def describe(study: "Study", only: list[str] | None = None) -> list[str]:
    """Lines for ``--dry-run``: what each selection chose, or that its test-set pipelines wait for it."""
    lines = []
    for sel in study.selections:
        if not matches(sel, only):
            continue
        cands = ", ".join(map(str, sel.candidates))
        if sel.chosen is None:
            seeds = sorted({p.seed for p in sel.options[0]})
            done = sum(v is not None for v in sel.values or [])
            lines.append(f"  {sel.where()}: {len(sel.options[0])} test-set pipelines (seeds {', '.join(map(str, seeds))}) "
                         f"wait for the selection of {sel.key} in [{cands}] by {sel.metric} on the validation split "
                         f"({done} of {len(sel.candidates)} selection pipelines recorded)")
        else:
            vals = ", ".join(f"{c}: {v:.4g}" for c, v in zip(sel.candidates, sel.values))
            ties = [c for c, g in zip(sel.candidates, gaps(sel.values, sel.metric)) if tied(g, sel.tie)]
            rule = (f"; tie margin {sel.tie:g}: {', '.join(map(str, ties))} tied, the first listed wins"
                    if sel.tie and len(ties) > 1 else "")
            lines.append(f"  {sel.where()}: {sel.key} = {sel.candidates[sel.chosen]} chosen by {sel.metric} on the "
                         f"validation split ({vals}{rule})")
    return lines

"""A study file's ``{select: [candidates], metric: ...}`` values: validated (:func:`check_selects`),
taken out of a pipeline's stages so that the grid expands over the candidates (:func:`take_select`), and
the family split into selection and test-set pipelines (:func:`split_selection`; ``selection``)."""
from __future__ import annotations

import dataclasses

from ptqlib.errors import ConfigError
from ptqlib.metrics import evaluate_metric_names, known_evaluate_metric
from ptqlib.study.kinds import KINDS
from ptqlib.study.params import LIST_KEYS, fields_of
from ptqlib.study.selection import missing_metric, split_family

SELECT_KEYS = {"select", "metric", "tie"}


def check_selects(path, where: str, kind: str, params: dict) -> None:
    """Validate each ``{select: [...], metric: ...}`` value of a stage's (or defaults') params."""
    for k, v in params.items():
        if not isinstance(v, dict):
            continue
        w = f"{path}: {where}.{k}"
        if not KINDS[kind].selectable:
            which = ", ".join(k for k, sk in KINDS.items() if sk.selectable)
            raise ConfigError(f"{w}: {v!r}: only {which} settings can be selected, not {kind} settings")
        if set(v) - SELECT_KEYS or "select" not in v:
            raise ConfigError(f"{w}: {v!r} is not a value; give a value, a list (a grid) or "
                              "{select: [candidates], metric: <metric>, tie: <margin>} (keys: select, metric, tie)")
        scalar = [f for f, fd in fields_of(KINDS[kind].params).items()
                  if f not in LIST_KEYS and f != "method" and fd.default is not dataclasses.MISSING]
        if k not in scalar:
            raise ConfigError(f"{w}: {k!r} cannot be selected (a method is a pipeline of its own; a list setting "
                              f"is not a scalar); valid: {', '.join(scalar)}")
        cands = v["select"]
        if not isinstance(cands, list) or not cands:
            raise ConfigError(f"{w}.select: {cands!r} must be a non-empty list of candidate values")
        default = fields_of(KINDS[kind].params)[k].default
        for c in cands:  # the values themselves are validated with the pipeline (FinetuneParams)
            if c is None or not ((isinstance(c, type(default)) or isinstance(default, float) and isinstance(c, int))
                                 and not (isinstance(c, bool) and not isinstance(default, bool))):
                raise ConfigError(f"{w}.select: candidate {c!r} has type {type(c).__name__}; "
                                  f"expected {type(default).__name__}")
        dup = next((c for i, c in enumerate(cands) if c in cands[:i]), None)
        if dup is not None:
            raise ConfigError(f"{w}.select: candidate {dup!r} is listed twice in {cands!r}")
        m = v.get("metric")
        if not known_evaluate_metric(m):
            raise ConfigError(f"{w}.metric: {m!r} is not a metric to select by; valid: {', '.join(evaluate_metric_names())}")
        tie = v.get("tie", 0.0)
        if isinstance(tie, bool) or not isinstance(tie, (int, float)) or not tie >= 0 or tie == float("inf"):
            raise ConfigError(f"{w}.tie: {tie!r} is not a margin; give a finite number >= 0 in {m}'s units "
                              "(candidates within it of the best are tied and the first listed wins; 0: exact ties)")


def take_select(path, where: str, parsed: list[tuple[str, dict]], entries: list) -> tuple | None:
    """The pipeline's select, if any: (stage index, key, candidates, metric, where it is written, tie margin),
    with the candidates put in its place so that the grid expands over them."""
    found = [(i, k, v) for i, (kind, params) in enumerate(parsed) for k, v in params.items() if isinstance(v, dict)]
    if not found:
        return None
    origin = [f"{where}[{i}].finetune.{k}" if isinstance(entries[i], dict) and isinstance(entries[i].get("finetune"), dict)
              and k in entries[i]["finetune"] else f"defaults.finetune.{k} (in {where}[{i}])" for i, k, _ in found]
    if len(found) > 1:
        raise ConfigError(f"{path}: {where}: selects {' and '.join(origin)}; one select per pipeline (give the "
                          "other stages a value of their own)")
    (i, k, spec), = found
    clash = [j for j, (_, params) in enumerate(parsed) if j != i and isinstance(params.get(k), list) and k not in LIST_KEYS]
    if clash:
        raise ConfigError(f"{path}: {origin[0]}: {k!r} is also a grid axis of {where}[{clash[0]}]; a setting "
                          "name is either selected or a grid axis in one pipeline")
    parsed[i][1][k] = list(spec["select"])
    return i, k, list(spec["select"]), spec["metric"], origin[0], float(spec.get("tie", 0.0))


def split_selection(path, family_pls: list, select: tuple, first_seed: int,
                    test_seeds: set | None = None) -> tuple[list, list]:
    """A family expanded over its candidates -> (its selection pipelines, its selections); its
    evaluate stage must record the metric."""
    stage, key, cands, metric, origin, tie = select
    why = missing_metric(metric, family_pls[0].stages[-1].params)
    if why:
        raise ConfigError(f"{path}: {origin}.metric: {metric!r} is not recorded by the pipeline's evaluate stage: {why}")
    return split_family(family_pls, stage, key, cands, metric, first_seed, test_seeds, tie)

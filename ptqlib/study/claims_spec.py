"""The ``claims:`` section of a study file: each claim's keys, pipelines, metric, relation and margin."""
from __future__ import annotations

import math
import re

from ptqlib import relations
from ptqlib.errors import ConfigError
from ptqlib.metrics import evaluate_metric_names, known_evaluate_metric
from ptqlib.study.loader import check_keys as _check_keys

CLAIM_KEYS = {"claim", "a", "b", "metric", "relation", "min_effect", "ref", "exploratory"}


def claim_metric(metric: str) -> bool:
    """A column results.csv will have: an evaluate metric (``metrics.evaluate_metric_names``) or a
    stage's (``finetune.train_loss_last``, ``quantize2.quant_seconds``)."""
    return known_evaluate_metric(metric) or re.fullmatch(r"(quantize|finetune)\d*\.\w+", metric) is not None


def checked_claims(path, raw: dict) -> list[dict]:
    """The study file's claims, validated, with ``relation`` (default ``>``) and ``min_effect`` (default 0) filled in;
    a ``ConfigError`` naming the claim, the key, the value and what is valid otherwise."""
    claims = raw.get("claims") or []
    if not isinstance(claims, list):
        raise ConfigError(f"{path}: claims: expected a list of {{claim, a, b, metric, relation}}")
    for i, c in enumerate(claims):
        if not isinstance(c, dict):
            raise ConfigError(f"{path}: claims[{i}]: expected a mapping, got {c!r}")
        _check_keys(path, f"claims[{i}]", c, CLAIM_KEYS)
        for k in ("claim", "a", "b", "metric"):
            if not isinstance(c.get(k), str):
                raise ConfigError(f"{path}: claims[{i}].{k}: required (a string)")
        for k in ("a", "b", "ref"):
            if (k != "ref" or k in c) and c[k] not in {str(p) for p in raw["pipelines"]}:
                raise ConfigError(f"{path}: claims[{i}].{k}: {c[k]!r} is not a pipeline; valid: "
                                  + ", ".join(map(str, raw["pipelines"])))
        if not claim_metric(c["metric"]):
            raise ConfigError(f"{path}: claims[{i}].metric: {c['metric']!r} is not a metric a study records; valid: "
                              f"{', '.join(evaluate_metric_names())}, <stage>.<metric> of a quantize / finetune stage "
                              "(e.g. finetune.train_loss_last)")
        c.setdefault("relation", ">")
        if c["relation"] not in relations.RELATIONS:
            raise ConfigError(f"{path}: claims[{i}].relation: {c['relation']!r}; valid: "
                              + ", ".join(f"{s} ({r.help})" for s, r in relations.RELATIONS.items()))
        m = c.setdefault("min_effect", 0.0)
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not m >= 0 or not math.isfinite(m):
            raise ConfigError(f"{path}: claims[{i}].min_effect: {m!r} must be a number >= 0 (the smallest difference "
                              "that counts, in the metric's units)")
        c["min_effect"] = float(m)
        if "ref" in c and (c["ref"] in (c["a"], c["b"]) or c["relation"] != ">"):
            raise ConfigError(f"{path}: claims[{i}].ref: {c['ref']!r} with a {c['a']!r}, b {c['b']!r}, relation "
                              f"{c['relation']!r}: a recovered-fraction claim, (a - b) / (ref - b) > min_effect, needs "
                              "a ref other than a and b and relation '>' (min_effect: the fraction, e.g. 0.5)")
        if not isinstance(c.get("exploratory", False), bool):
            raise ConfigError(f"{path}: claims[{i}].exploratory: {c['exploratory']!r} must be true or false (true: "
                              "decided and shown, outside the study's Holm family)")
        if c["a"] == c["b"]:
            raise ConfigError(f"{path}: claims[{i}]: a and b are both {c['a']!r}; a claim compares two pipelines "
                              "(a pipeline against itself 'holds' with p = 0)")
    return claims

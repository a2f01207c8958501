"""Claim relations (ptqlib.relations): the built-in three decide as documented, and a new relation is one
register call that the study file's check, the verdict, both p-values and the hypothesis all read."""
import math
import textwrap

import numpy as np
import pandas as pd
import pytest

from ptqlib import relations
from ptqlib.errors import ConfigError
from ptqlib.relations import Relation
from ptqlib.report.claims import Claim, check_claims, hypothesis
from ptqlib.report.inference import p_fails, p_holds
from ptqlib.study.schema import load_study


@pytest.mark.parametrize("symbol, lo, hi, m, verdict", [
    (">", 0.03, 0.05, 0.02, "holds"), (">", 0.01, 0.05, 0.02, "undecided (interval contains the boundary)"),
    (">", -0.05, 0.01, 0.02, "does not hold"), (">=", -0.01, 0.05, 0.02, "holds"),
    (">=", -0.05, -0.03, 0.02, "does not hold"), ("==", -0.01, 0.01, 0.02, "holds"),
    ("==", 0.03, 0.05, 0.02, "does not hold"), ("==", -0.05, -0.03, 0.02, "does not hold"),
    ("==", -0.01, 0.03, 0.02, "undecided (interval contains the boundary)"),
    ("==", math.nan, 0.01, 0.02, "undecided (no interval)"),
])
def test_the_built_in_relations_decide_as_documented(symbol, lo, hi, m, verdict):
    assert relations.relation(symbol).decide(lo, hi, m) == verdict


def test_an_unknown_relation_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"relation '<>'; valid: >, >=, =="):
        relations.relation("<>")


def _units(shift: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(0)
    base = rng.uniform(0.3, 0.9, size=(3, 64))
    rows, units = [], []
    for fam, vals in (("a", base + shift + rng.normal(0, 0.01, base.shape)), ("b", base)):
        for seed, v in enumerate(vals):
            rows.append({"pipeline": f"{fam}[seed={seed}]", "family": fam, "model": "m", "seed": seed,
                         "stages": "finetune(lora) -> evaluate", "field_f1": float(v.mean()), "status": "ok"})
            units += [{"pipeline": f"{fam}[seed={seed}]", "family": fam, "seed": seed, "group": "task", "unit": i,
                       "field_f1": x} for i, x in enumerate(v)]
    return pd.DataFrame(rows), pd.DataFrame(units)


def test_a_new_relation_is_one_register_call(tmp_path, monkeypatch):
    """'<' (a is worse than b by more than min_effect), registered here alone: accepted by load_study,
    decided by check_claims in both directions with p-values that agree, stated in words."""
    monkeypatch.setattr(relations, "RELATIONS", dict(relations.RELATIONS))
    relations.register(Relation("<", "a is worse than b by more than min_effect", lambda m: (-math.inf, -m),
                                lambda d, a, b, m: (f"{d} < -{m:g}", [])))
    with pytest.raises(ValueError, match="'<' is registered twice"):
        relations.register(relations.RELATIONS["<"])
    f = tmp_path / "s.yaml"
    f.write_text(textwrap.dedent("""
        model: tiny
        pipelines: {a: [{finetune: full}], b: []}
        claims: [{claim: x, a: a, b: b, metric: field_f1, relation: "<", min_effect: 0.01}]
    """))
    assert load_study(f).claims[0]["relation"] == "<"
    res, units = _units(-0.05)  # a is clearly worse
    row = check_claims([{"claim": "c", "a": "a", "b": "b", "metric": "field_f1", "relation": "<",
                         "min_effect": 0.01}], res, units).iloc[0]
    assert row["verdict"] == "holds" and row["p_holds"] < 0.025 < row["p_fails"]
    res, units = _units(+0.05)
    row = check_claims([{"claim": "c", "a": "a", "b": "b", "metric": "field_f1", "relation": "<",
                         "min_effect": 0.01}], res, units).iloc[0]
    assert row["verdict"] == "does not hold" and row["p_fails"] < 0.025 < row["p_holds"]
    assert hypothesis(Claim("c", "a", "b", "field_f1", "<", 0.01)) == "a - b < -0.01"
    assert hypothesis(Claim("c", "a", "b", "ppl", "<", 0.01)) == "b - a < -0.01 (lower is better)"


def test_a_relation_the_registry_lacks_is_refused_at_load_naming_the_valid_ones(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("model: tiny\npipelines: {a: [{finetune: full}], b: []}\n"
                 "claims: [{claim: x, a: a, b: b, metric: field_f1, relation: '<'}]\n")
    with pytest.raises(ConfigError, match=r"claims\[0\]\.relation: '<'; valid: > \(a beats b by more than min_effect\), "
                                          r">= \(a is not worse"):
        load_study(f)


@pytest.mark.parametrize("symbol", [">", ">=", "=="])
def test_p_values_agree_with_the_interval_for_every_relation(symbol):
    """p_holds < 0.025 exactly when the 95% t interval decides holds; p_fails likewise for does not hold."""
    from scipy import stats

    for d in np.linspace(-0.1, 0.1, 41):
        se, df, m = 0.02, 6.0, 0.03
        half = stats.t.ppf(0.975, df) * se
        verdict = relations.relation(symbol).decide(d - half, d + half, m)
        assert (p_holds(symbol, d, se, df, m) < 0.025) == (verdict == "holds"), (d, verdict)
        assert (p_fails(symbol, d, se, df, m) < 0.025) == (verdict == "does not hold"), (d, verdict)

"""The recovered fraction (a - b) / (r - b): its Fieller interval covers at the studies' designs (>= 93% of 1000
simulated studies; 94.8-95.1% in 3000 of the first setting's contrast tests), and an interval that drops the seed
component, the negative control, does not."""
import math

import numpy as np
import pytest

from ptqlib.metrics import Statistic
from ptqlib.report.recovered import p_recovers, recovered_interval

MEAN = Statistic("task", "score")


def _study(rng, S: int, N: int, means: tuple[float, float, float], seed_sd: float, ex_sd: float, noise_sd: float):
    """Units of pipelines a, b, r under the crossed model: a shared example effect, each pipeline's own seed
    effects, per-pipeline example deviations and noise; returns three (num, den) pairs (S, N)."""
    shared = rng.normal(0, ex_sd, N)
    out = []
    for mu in means:
        x = mu + rng.normal(0, seed_sd, (S, 1)) + shared + rng.normal(0, ex_sd / 2, N) + rng.normal(0, noise_sd, (S, N))
        out.append((x, np.ones_like(x)))
    return out


def _coverage(S, N, means, seed_sd, ex_sd=0.1, noise_sd=0.1, sims=1000):
    rng = np.random.default_rng(0)
    true = (means[0] - means[1]) / (means[2] - means[1])
    hit = 0
    for _ in range(sims):
        a, b, r = _study(rng, S, N, means, seed_sd, ex_sd, noise_sd)
        iv = recovered_interval(a, b, r, MEAN)
        hit += iv.lo <= true <= iv.hi
    return hit / sims


@pytest.mark.parametrize("S, means, seed_sd", [
    (5, (0.70, 0.60, 0.80), 0.02),  # a clear loss (0.2, ~10 se)
    (5, (0.60, 0.60, 0.65), 0.03),  # nothing recovered of a loss of ~2.5 se: R's distribution is skewed
    (3, (0.64, 0.60, 0.68), 0.02),  # a small loss at 3 seeds
])
def test_the_fieller_interval_covers(S, means, seed_sd):
    assert _coverage(S, 128, means, seed_sd) >= 0.93


def test_the_coverage_check_rejects_an_interval_without_the_seed_part(monkeypatch):
    """The negative control: the same construction with the seed component dropped (as if every seed were
    the same run) covers far too little, and the check above would fail it."""
    import ptqlib.report.recovered as rec

    real = rec.components

    def examples_only(d, n_eff=None):
        seed_var, example_var, df = real(d, n_eff)
        return np.zeros_like(seed_var), example_var, df

    monkeypatch.setattr(rec, "components", examples_only)
    assert _coverage(5, 128, (0.70, 0.60, 0.80), 0.02, sims=300) < 0.8


def test_the_bounds_are_where_the_contrast_test_turns():
    """At each finite bound the t test of C(R0) sits exactly at its critical value, and the p-values of
    'R > m' agree with the interval: below 0.025 exactly when lo > m."""
    rng = np.random.default_rng(3)
    a, b, r = _study(rng, 5, 128, (0.70, 0.60, 0.80), 0.02, 0.1, 0.1)
    iv = recovered_interval(a, b, r, MEAN)
    assert math.isfinite(iv.lo) and math.isfinite(iv.hi) and iv.lo < iv.fraction < iv.hi
    for m, side in ((iv.lo - 1e-6, 0), (iv.lo + 1e-6, 1), (iv.hi - 1e-6, 1), (iv.hi + 1e-6, 0)):
        p_above, p_below = p_recovers(a, b, r, MEAN, m)
        inside = side == 1
        assert (min(p_above, p_below) >= 0.025) == inside, (m, p_above, p_below)
    # the fraction is the ratio of the means, whatever the noise
    means = [x[0].mean() for x in (a, b, r)]
    assert iv.fraction == pytest.approx((means[0] - means[1]) / (means[2] - means[1]), rel=1e-12)


def test_lower_is_better_keeps_the_fraction_and_flips_the_loss():
    rng = np.random.default_rng(4)
    a, b, r = _study(rng, 5, 64, (0.70, 0.60, 0.80), 0.02, 0.1, 0.1)
    up = recovered_interval(a, b, r, MEAN)
    down = recovered_interval(a, b, r, MEAN, sign=-1.0)
    assert down.fraction == pytest.approx(up.fraction) and down.loss == pytest.approx(-up.loss)
    assert (down.lo, down.hi) == pytest.approx((up.lo, up.hi))


def test_no_clear_loss_gives_an_unbounded_interval():
    rng = np.random.default_rng(5)
    a, b, r = _study(rng, 3, 32, (0.61, 0.60, 0.605), 0.05, 0.1, 0.1)
    iv = recovered_interval(a, b, r, MEAN)
    assert math.isinf(iv.lo) or math.isinf(iv.hi)


def _records(per_family: dict) -> tuple:
    """results + units for families given as {name: (seeds, examples) array of field F1 per example}."""
    import pandas as pd

    rows, units = [], []
    for fam, vals in per_family.items():
        for seed, v in enumerate(vals):
            rows.append({"pipeline": f"{fam}[seed={seed}]", "family": fam, "model": "m", "seed": seed,
                         "stages": "finetune(lora) -> evaluate", "field_f1": float(np.mean(v)), "status": "ok"})
            units += [{"pipeline": f"{fam}[seed={seed}]", "family": fam, "seed": seed, "group": "task", "unit": i,
                       "field_f1": x} for i, x in enumerate(v)]
    return pd.DataFrame(rows), pd.DataFrame(units)


@pytest.mark.parametrize("boundary, want", [(0.3, "holds"), (0.5, "undecided"), (0.7, "does not hold")])
def test_a_recovered_fraction_claim_is_decided_by_its_fieller_interval(boundary, want):
    """ref 0.8, PTQ 0.6, the method 0.7 (R = 0.5) at 5 seeds x 128 examples: 'R > 0.3' holds, 'R > 0.5' cannot be
    told, 'R > 0.7' does not hold; the p-values say the same, and the row carries the fraction and its bounds."""
    from ptqlib.report.claims import check_claims

    rng = np.random.default_rng(7)
    (a, _), (b, _), (r, _) = _study(rng, 5, 128, (0.70, 0.60, 0.80), 0.01, 0.1, 0.05)
    results, units = _records({"m": a, "ptq": b, "ref": r})
    row = check_claims([{"claim": "c", "a": "m", "b": "ptq", "ref": "ref", "metric": "field_f1", "relation": ">",
                         "min_effect": boundary}], results, units).iloc[0]
    assert row["verdict"].startswith(want) and row["ref"] == "ref"
    assert row["ci_low"] < row["difference"] < row["ci_high"]
    assert row["difference"] == pytest.approx((a.mean() - b.mean()) / (r.mean() - b.mean()))
    assert (row["p_holds"] < 0.025) == (want == "holds") and (row["p_fails"] < 0.025) == (want == "does not hold")
    assert "/ (ref - ptq) > " in row["tested"]


def test_a_claim_without_a_loss_is_undecided():
    from ptqlib.report.claims import check_claims

    rng = np.random.default_rng(8)
    (a, _), (b, _), (r, _) = _study(rng, 5, 64, (0.70, 0.60, 0.55), 0.01, 0.1, 0.05)  # the ref is worse than PTQ
    results, units = _records({"m": a, "ptq": b, "ref": r})
    row = check_claims([{"claim": "c", "a": "m", "b": "ptq", "ref": "ref", "metric": "field_f1", "relation": ">",
                         "min_effect": 0.5}], results, units).iloc[0]
    assert row["verdict"] == "undecided (ref is not better than ptq: no loss to recover)"


@pytest.mark.parametrize("extra, error", [
    ("ref: nope", r"claims\[0\].ref: 'nope' is not a pipeline"),
    ("ref: b", r"claims\[0\].ref: 'b' .*needs a ref other than a and b and relation '>'"),
    ("ref: r, relation: '=='", r"claims\[0\].ref: 'r' .*relation '=='.*needs .*relation '>'"),
])
def test_a_bad_recovered_fraction_claim_is_refused_at_load(tmp_path, extra, error):
    from ptqlib.errors import ConfigError
    from ptqlib.study.schema import load_study

    f = tmp_path / "s.yaml"
    f.write_text("model: tiny\npipelines:\n  a: []\n  b: []\n  r: []\n"
                 f"claims:\n  - {{claim: c, a: a, b: b, metric: field_f1, {extra}}}\n")
    with pytest.raises(ConfigError, match=error):
        load_study(f)

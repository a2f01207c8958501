"""Claim verdicts on synthetic records whose truth is known: the crossed seeds x examples t interval,
the seed rule, Holm, the flags (coverage: tests/report/test_coverage.py)."""
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from ptqlib.metrics import Statistic
from ptqlib.report.analysis import mean_pm, summarise
from ptqlib.report.claims import Claim, check_claims, decide, hypothesis, paired_bootstrap
from ptqlib.report.inference import effective_units, holm, p_holds, paired_interval


def results(a_vals, b_vals, metric="field_f1", trains=True):
    rows = []
    for fam, vals in (("a", a_vals), ("b", b_vals)):
        for seed, v in enumerate(vals):
            rows.append({"pipeline": f"{fam}[seed={seed}]", "family": fam, "model": "m", "seed": seed,
                         "stages": "finetune(lora) -> evaluate" if trains else "evaluate", metric: v, "status": "ok"})
    return pd.DataFrame(rows)


def records(per_seed_a, per_seed_b, col="field_f1", group="task", trains=True):
    """results + units for families a and b; per_seed_*: one list of per-example values per seed."""
    rows, units = [], []
    for fam, seeds in (("a", per_seed_a), ("b", per_seed_b)):
        for seed, vals in enumerate(seeds):
            rows.append({"pipeline": f"{fam}[seed={seed}]", "family": fam, "model": "m", "seed": seed,
                         "stages": "finetune(lora) -> evaluate" if trains else "quantize(nf4) -> evaluate",
                         col: float(np.mean(vals)), "status": "ok"})
            units += [{"pipeline": f"{fam}[seed={seed}]", "family": fam, "seed": seed, "group": group, "unit": i,
                       col: v} for i, v in enumerate(vals)]
    return pd.DataFrame(rows), pd.DataFrame(units)


def claim(relation=">", metric="field_f1", **kw):
    return [{"claim": "c", "a": "a", "b": "b", "metric": metric, "relation": relation, **kw}]


RNG = np.random.default_rng(1)
BASE = RNG.uniform(0.3, 0.9, size=(3, 128)).round(3)  # three seeds x 128 examples


def test_identical_pipelines_are_undecided():
    res, units = records(BASE, BASE)
    t = check_claims(claim(">"), res, units)
    assert t.loc[0, "difference"] == 0 and t.loc[0, "ci_low"] == 0 and t.loc[0, "ci_high"] == 0
    assert t.loc[0, "verdict"].startswith("undecided")
    assert check_claims(claim(">="), res, units).loc[0, "verdict"].startswith("undecided")  # no margin: cannot tell
    assert check_claims(claim("==", min_effect=0.01), res, units).loc[0, "verdict"] == "holds"


NOISE = np.random.default_rng(3).normal(0, 0.02, size=BASE.shape)  # a per-example, per-seed wobble


def test_clear_shift_is_decided_both_ways():
    res, units = records(np.clip(BASE + 0.1 + NOISE, 0, 1), BASE)
    t = check_claims(claim(">"), res, units)
    assert t.loc[0, "verdict"] == "holds" and 0 < t.loc[0, "ci_low"] < t.loc[0, "difference"] < t.loc[0, "ci_high"]
    assert t.loc[0, "n_examples"] == 128 and t.loc[0, "n_seeds"] == 3
    res, units = records(BASE, np.clip(BASE + 0.1, 0, 1))
    assert check_claims(claim(">"), res, units).loc[0, "verdict"] == "does not hold"
    assert check_claims(claim(">="), res, units).loc[0, "verdict"] == "does not hold"
    assert check_claims(claim("=="), res, units).loc[0, "verdict"] == "does not hold"


def test_one_example_difference_on_128_does_not_decide():
    a = BASE[:1].copy()
    a[0, 5] = min(1.0, a[0, 5] + 1.0)  # one example better, the other 127 equal
    res, units = records(a, BASE[:1], trains=False)  # one run each: only the example component
    t = check_claims(claim(">"), res, units)
    assert t.loc[0, "difference"] > 0 and t.loc[0, "ci_low"] < 0
    assert t.loc[0, "verdict"] == "undecided (interval contains the boundary)"


def test_min_effect_is_the_boundary():
    res, units = records(np.clip(BASE + 0.03, 0, 1), BASE)
    assert check_claims(claim(">"), res, units).loc[0, "verdict"] == "holds"
    assert check_claims(claim(">", min_effect=0.2), res, units).loc[0, "verdict"] == "does not hold"
    res, units = records(np.clip(BASE - 0.005, 0, 1), BASE)  # a hair worse: non-inferior at a 0.05 margin
    assert check_claims(claim(">=", min_effect=0.05), res, units).loc[0, "verdict"] == "holds"
    assert check_claims(claim("==", min_effect=0.05), res, units).loc[0, "verdict"] == "holds"


def test_equivalence_needs_the_whole_interval_inside_the_margin():
    """== is two one-sided tests: it holds only when [lo, hi] lies inside [-m, m]."""
    res, units = records(BASE + 0.01 + NOISE, BASE)  # +0.01 with a wobble: an interval about [0.005, 0.015]
    t = check_claims(claim("==", min_effect=0.02), res, units).iloc[0]
    assert -0.02 < t.ci_low and t.ci_high < 0.02 and t.verdict == "holds"
    t = check_claims(claim("==", min_effect=0.01), res, units).iloc[0]  # the margin inside the interval
    assert t.ci_low < 0.01 < t.ci_high and t.verdict == "undecided (interval contains the boundary)"
    t = check_claims(claim("==", min_effect=0.002), res, units).iloc[0]
    assert t.ci_low > 0.002 and t.verdict == "does not hold"


def test_seed_disagreement_widens_the_interval():
    """Seeds disagree (a >> b, a << b, a >> b): the seed spread must keep the claim undecided,
    although every example-level interval within one seed would decide it."""
    a = np.stack([np.clip(BASE[0] + 0.3, 0, 1), np.clip(BASE[1] - 0.3, 0, 1), np.clip(BASE[2] + 0.3, 0, 1)])
    res, units = records(a, BASE)
    t = check_claims(claim(">"), res, units)
    assert t.loc[0, "verdict"].startswith("undecided") and t.loc[0, "ci_low"] < 0 < t.loc[0, "ci_high"]
    assert t.loc[0, "seed_sd"] > 0.3 and t.loc[0, "df"] < 3  # the seed part dominates: about S - 1 df


def test_trained_pipelines_need_three_seeds():
    """Two seeds do not estimate the seed variance: the interval is shown, the claim is not decided."""
    res, units = records(np.clip(BASE[:2] + 0.2, 0, 1), BASE[:2])
    t = check_claims(claim(">"), res, units).iloc[0]
    assert t.verdict == "undecided (needs >= 3 seeds; has 2)" and t.ci_low > 0 and t.n_seeds == 2
    assert math.isnan(t.p_holds) and math.isnan(t.p_holm) and t.verdict_holm == t.verdict
    res, units = records(np.clip(BASE[:2] + 0.2, 0, 1), BASE[:2], trains=False)  # no training: decided
    assert check_claims(claim(">"), res, units).loc[0, "verdict"] == "holds"


def test_single_run_pairs_with_every_seed():
    res, units = records(np.clip(BASE + 0.2, 0, 1), BASE[:1])  # b does not train: one run
    t = check_claims(claim(">"), res, units)
    assert t.loc[0, "n_seeds"] == 3 and t.loc[0, "verdict"] == "holds"


def test_perplexity_from_windows_lower_is_better():
    nll_b = RNG.uniform(700, 900, size=(3, 64))
    rows, units = [], []
    for fam, nll in (("a", nll_b - 60), ("b", nll_b)):
        for s in range(3):
            rows.append({"pipeline": f"{fam}[seed={s}]", "family": fam, "seed": s, "stages": "finetune",
                         "ppl": math.exp(nll[s].sum() / (255 * 64)), "status": "ok"})
            units += [{"pipeline": f"{fam}[seed={s}]", "family": fam, "seed": s, "group": "ppl", "unit": i,
                       "nll": v, "tokens": 255.0} for i, v in enumerate(nll[s])]
    res, units = pd.DataFrame(rows), pd.DataFrame(units)
    t = check_claims(claim(">", metric="ppl"), res, units)
    assert t.loc[0, "difference"] < 0 and t.loc[0, "ci_high"] < 0 and t.loc[0, "verdict"] == "holds"
    assert t.loc[0, "tested"] == "b - a > 0 (lower is better)"  # the sign flip, stated
    # the pooled statistic is exp(total NLL / total tokens), as the evaluate stage computes it
    assert t.loc[0, "mean_b"] == pytest.approx(math.exp(nll_b.sum() / (255 * 192)))


def test_micro_averaged_ratio_is_resampled_as_a_ratio():
    st = Statistic("task", "fact_sup", "fact_pred")
    num = np.array([[1.0, 9.0]]), np.array([[10.0, 10.0]])
    d, lo, hi = paired_bootstrap(num[0], num[1], num[1] * 0.5, num[1], st, n_boot=500)
    assert d == pytest.approx(10 / 20 - 0.5) and lo <= d <= hi


@pytest.mark.parametrize("st", [Statistic("task", "sup", "pred"), Statistic("ppl", "nll", "tokens", exp=True)])
def test_delta_method_matches_the_example_bootstrap_for_ratios(st):
    """One seed: the influence-value SE of a micro-averaged ratio and of exp(mean NLL) is the
    example bootstrap's (the bootstrap recomputes the ratio; the delta method linearises it)."""
    rng = np.random.default_rng(5)
    den = rng.integers(1, 9, size=(1, 256)).astype(float) if not st.exp else np.full((1, 256), 255.0)
    rate = rng.uniform(0.6, 1.0, size=den.shape) if not st.exp else rng.uniform(2.8, 3.4, size=den.shape)
    num_b = den * rate
    num_a = num_b + den * rng.normal(0.02, 0.1, size=den.shape)
    iv = paired_interval(num_a, den, num_b, den, st)
    d, lo, hi = paired_bootstrap(num_a, den, num_b, den, st, n_boot=4000)
    # df: the units' effective number less one (a fact count of 1-8 per example weighs them unequally)
    assert float(iv.difference) == pytest.approx(d) and iv.df == pytest.approx(effective_units(den[0]) - 1)
    assert (iv.df == 255) == bool(st.exp)
    assert float(iv.hi - iv.lo) == pytest.approx(hi - lo, rel=0.1)


def test_interval_is_reproducible_and_has_the_textbook_se():
    noise = np.random.default_rng(2).normal(0.05, 0.1, size=BASE.shape)
    res, units = records(BASE + noise, BASE)
    t1, t2 = check_claims(claim(), res, units), check_claims(claim(), res, units)
    assert t1.loc[0, "ci_low"] == t2.loc[0, "ci_low"] and t1.loc[0, "ci_high"] == t2.loc[0, "ci_high"]
    lo, d, hi, se, df = t1.loc[0, ["ci_low", "difference", "ci_high", "se", "df"]]
    assert d == pytest.approx(noise.mean()) and lo < d < hi
    textbook = noise.std() / math.sqrt(noise.size)  # iid noise: no seed or example component
    assert 0.8 * textbook < se < 1.6 * textbook  # the floor keeps it at least the interaction's share
    assert hi - lo == pytest.approx(2 * stats.t.ppf(0.975, df) * se)  # with 3 seeds, t with about 2 df
    assert 2 <= df < 4


def test_run_level_interval_is_the_t_interval_over_seeds():
    d = np.array([0.30, 0.31, 0.27, 0.33])
    iv = paired_interval(d[:, None], np.ones((4, 1)), np.zeros((4, 1)), np.ones((4, 1)), Statistic("run", "v"))
    half = stats.t.ppf(0.975, 3) * d.std(ddof=1) / 2
    assert iv.df == 3
    assert float(iv.lo) == pytest.approx(d.mean() - half) and float(iv.hi) == pytest.approx(d.mean() + half)


@pytest.mark.parametrize("a, b, relation, verdict", [
    ([0.80, 0.82, 0.79], [0.50, 0.51, 0.52], ">", "holds"),
    ([0.50, 0.51, 0.52], [0.80, 0.82, 0.79], ">", "does not hold"),
    ([0.50, 0.60, 0.55], [0.52, 0.58, 0.56], ">", "undecided (interval contains the boundary)"),
    ([0.40, 0.41, 0.42], [0.80, 0.82, 0.81], ">=", "does not hold"),
    ([0.80, 0.82], [0.50, 0.52], ">", "undecided (needs >= 3 seeds; has 2)"),
    ([0.8], [0.5], ">", "undecided (needs >= 3 seeds; has 1)"),
])
def test_run_level_metrics_use_the_seeds(a, b, relation, verdict):
    """Without per-example units (size, speed, train loss) the interval comes from the seeds alone."""
    t = check_claims(claim(relation), results(a, b))
    assert t.loc[0, "verdict"] == verdict and t.loc[0, "n_examples"] == 0


def test_prefixed_lower_is_better_metric():
    df = results([0.1, 0.12, 0.11], [0.9, 0.95, 0.91], metric="finetune.train_loss_last")
    t = check_claims(claim(">", metric="finetune.train_loss_last"), df)
    assert t.loc[0, "verdict"] == "holds"


def test_deterministic_pipelines_decide_run_level_metrics():
    df = results([0.7], [0.5], trains=False)  # no training: one run is the whole distribution
    t = check_claims(claim(">"), df)
    assert t.loc[0, "seed_sd"] == 0 and t.loc[0, "verdict"] == "holds"


def test_decide_rejects_unknown_relation():
    with pytest.raises(ValueError, match="'<'"):
        decide("<", 0.0, 1.0)


@pytest.mark.parametrize("metric, relation, m, text", [
    ("field_f1", ">", 0.02, "a - b > 0.02"),
    ("field_f1", ">=", 0.02, "a - b > -0.02 (not worse by more than 0.02)"),
    ("field_f1", ">=", 0.0, "a - b > 0 (no margin: as strict as '>')"),
    ("field_f1", "==", 0.02, "|a - b| < 0.02"),
    ("ppl", ">=", 0.5, "b - a > -0.5 (not worse by more than 0.5; lower is better)"),
    ("ppl", "==", 0.5, "|a - b| < 0.5"),
    ("field_f1", "==", 0.0, "|a - b| < 0 (no margin: cannot hold)"),
])
def test_tested_states_the_hypothesis(metric, relation, m, text):
    assert hypothesis(Claim("c", "a", "b", metric, relation, m)) == text


def test_p_holds_agrees_with_the_interval():
    """p < 0.025 exactly when the 95% interval says holds, for every relation (TOST for ==)."""
    se, df, m = 0.01, 4.0, 0.02
    half = stats.t.ppf(0.975, df) * se
    for d in np.linspace(-0.08, 0.08, 161):
        for rel in (">", ">=", "=="):
            holds = decide(rel, d - half, d + half, m) == "holds"
            assert (p_holds(rel, d, se, df, m) < 0.025) == holds, (rel, d)


def test_holm_adjusts_step_down():
    adjusted = holm([0.01, 0.04, 0.03, math.nan])
    assert adjusted[:3] == pytest.approx([0.03, 0.06, 0.06]) and math.isnan(adjusted[3])


def test_holm_verdict_over_a_studys_claims():
    """Holm over every tested claim in the direction its data favour: a strong "holds" and a strong "does
    not hold" survive; a claim that holds at p = 0.02 and one that does not hold at p = 0.02 each stand
    alone, but not after Holm (4 tests: 0.02 x 2 = 0.04 > 0.025)."""
    res, units = records(np.clip(BASE + 0.05 + NOISE, 0, 1), BASE)
    one = check_claims(claim(">"), res, units).iloc[0]
    q = stats.t.ppf(0.98, one.df) * one.se
    claims = claim(">") + claim(">", min_effect=one.difference - q) + claim(">", min_effect=one.difference + q) \
        + claim(">", min_effect=0.2)
    t = check_claims(claims, res, units)
    assert t.verdict.tolist() == ["holds", "holds", "does not hold", "does not hold"]
    assert t.p_holds[1] == pytest.approx(0.02) and t.p_fails[2] == pytest.approx(0.02)
    assert t.p_holm[1] == pytest.approx(0.04) and t.p_holm[2] == pytest.approx(0.04)
    assert t.verdict_holm.tolist() == ["holds", "undecided (after Holm)", "undecided (after Holm)", "does not hold"]
    assert (t.p_holds + t.p_fails).round(12).tolist() == [1.0] * 4  # one-sided tests of one t: they sum to 1


def test_floor_and_ceiling_are_flagged():
    zeros = np.zeros_like(BASE)
    res, units = records(np.clip(BASE + 0.2, 0, 1), zeros)
    assert check_claims(claim(">"), res, units).loc[0, "flags"] == "b at floor (field_f1 0.000)"
    res, units = records(np.ones_like(BASE), zeros)
    assert check_claims(claim(">"), res, units).loc[0, "flags"] == (
        "a at ceiling (field_f1 1.000); b at floor (field_f1 0.000)")
    res, units = records(np.clip(BASE + 0.05, 0, 1), BASE)
    assert check_claims(claim(">"), res, units).loc[0, "flags"] == ""


def test_redecide_rewrites_only_the_claims(tmp_path):
    import json

    from ptqlib.report.analysis import redecide

    res, units = records(np.clip(BASE[:2] + 0.2, 0, 1), BASE[:2])
    res.to_csv(tmp_path / "results.csv", index=False)
    units.to_csv(tmp_path / "units.csv", index=False)
    before = (tmp_path / "results.csv").read_bytes(), (tmp_path / "units.csv").read_bytes()
    with pytest.raises(ValueError, match="declares no claims"):
        redecide(tmp_path)
    (tmp_path / "study.json").write_text(json.dumps({"claims": claim(">")}))
    table = redecide(tmp_path)
    on_disk = pd.read_csv(tmp_path / "claims.csv")
    assert on_disk.verdict.tolist() == table.verdict.tolist() == ["undecided (needs >= 3 seeds; has 2)"]
    assert {"tested", "p_holds", "p_holm", "verdict_holm", "flags"} <= set(on_disk.columns)
    assert ((tmp_path / "results.csv").read_bytes(), (tmp_path / "units.csv").read_bytes()) == before


def test_bad_input_names_the_value():
    st, one = Statistic("task", "x"), np.ones((2, 3))
    with pytest.raises(ValueError, match=r"unpaired units: a has shape \(2, 3\), b \(2, 4\)"):
        paired_interval(one, one, np.ones((2, 4)), np.ones((2, 4)), st)
    with pytest.raises(ValueError, match="level 95: must be in"):
        paired_interval(one, one, one, one, st, level=95)
    with pytest.raises(ValueError, match="'<'; valid: >, >=, =="):
        p_holds("<", 0.1, 0.01, 3.0)
    with pytest.raises(ValueError, match="'<'; valid"):
        hypothesis(Claim("c", "a", "b", "field_f1", "<"))


def test_summarise_mean_std():
    s = summarise(results([0.8, 0.6], [0.5, 0.5]), ["field_f1"])
    assert s.loc[("a", "m"), ("field_f1", "mean")] == pytest.approx(0.7)
    assert s.loc[("a", "m"), ("field_f1", "count")] == 2


def test_mean_pm_table():
    df = results([0.8, 0.6], [0.5], trains=False)
    t = mean_pm(df, ["field_f1"], digits=2)
    assert list(t.index) == ["a", "b"]  # study order
    assert t.loc["a", "field_f1"] == "0.70 ± 0.14" and t.loc["b", "field_f1"] == "0.50"
    assert t.loc["a", "n"] == 2
    with pytest.raises(KeyError, match="rouge_l"):
        mean_pm(df, ["rouge_l"])


def _chain_results():
    rows = []
    for seed in (0, 1):
        rows.append({"pipeline": f"ft_nf4_qlora[seed={seed}]", "family": "ft_nf4_qlora", "model": "m", "seed": seed,
                     "status": "ok", "stages": "finetune(full, 20 steps, seed 0) -> quantize(nf4) -> "
                                               "finetune(qlora, 10 steps, seed 0) -> evaluate",
                     "finetune.method": "full", "finetune.lr": 5e-5, "finetune.steps": 20, "finetune.batch_size": 4,
                     "quantize.method": "nf4", "quantize.blocksize": 64, "quantize.double_quant": True,
                     "finetune2.method": "qlora", "finetune2.lr": 2e-4, "finetune2.steps": 10, "finetune2.rank": 16,
                     "finetune2.alpha": 32.0, "wall_s.finetune": 100.0 + seed, "wall_s.quantize": 10.0,
                     "wall_s.finetune2": 50.0, "wall_s.evaluate": 30.0, "wall_s.total": 190.0 + seed})
    rows.append({"pipeline": "base", "family": "base", "model": "m", "seed": 0, "status": "ok", "stages": "evaluate",
                 "wall_s.evaluate": 40.0, "wall_s.total": 40.0})
    return pd.DataFrame(rows)


def test_settings_table_names_each_stage_in_chain_order():
    from ptqlib.report.analysis import settings_table

    t = settings_table(_chain_results())
    assert t.loc["ft_nf4_qlora", "stages"] == (
        "finetune(full: lr 5e-05, steps 20, batch_size 4) -> quantize(nf4: blocksize 64, double_quant True) -> "
        "finetune(qlora: lr 0.0002, steps 10, rank 16, alpha 32) -> evaluate")
    assert t.loc["ft_nf4_qlora", "seeds"] == "0, 1" and t.loc["base", "stages"] == "evaluate"


def test_cost_table_keeps_each_fine_tuning():
    from ptqlib.report.analysis import cost_table

    t = cost_table(_chain_results())
    assert t.loc["ft_nf4_qlora", "finetune (s)"] == pytest.approx(100.5)  # mean over seeds
    assert t.loc["ft_nf4_qlora", "finetune2 (s)"] == 50.0 and t.loc["ft_nf4_qlora", "total (s)"] == 190.5
    assert t.loc["base", "evaluate (s)"] == 40.0 and math.isnan(t.loc["base", "finetune (s)"])


def test_notebook_outputs_are_written_and_read_back(tmp_path):
    """What 04_analyse writes (summary.csv, claims.csv) and reads (results, units, records)."""
    import json

    from ptqlib.report.analysis import load_outputs, sample_generations, write_claims, write_summary

    res, units = records(BASE + 0.2, BASE)
    with pytest.raises(FileNotFoundError, match="no results.csv"):
        load_outputs(tmp_path)
    stages = [f"s{i}" for i in range(len(res))]
    res.assign(eval_stage=stages).to_csv(tmp_path / "results.csv", index=False)
    units.to_csv(tmp_path / "units.csv", index=False)
    (tmp_path / "study.json").write_text(json.dumps({"claims": claim(">")}))
    out = load_outputs(tmp_path)
    assert len(out.results) == 6 and len(out.units) == 6 * 128 and out.stages == {}
    summary = write_summary(out.results, tmp_path)
    assert list(pd.read_csv(tmp_path / "summary.csv", index_col=0).index) == list(summary.index) == ["a", "b"]
    table = write_claims(out.meta["claims"], out.results, out.units, tmp_path)
    on_disk = pd.read_csv(tmp_path / "claims.csv")
    assert on_disk.verdict.tolist() == table.verdict.tolist() == ["holds"]
    assert table.interval[0] == f"[{table.ci_low[0]:+.3f}, {table.ci_high[0]:+.3f}]"
    runs = tmp_path / "runs"
    (runs / "s0").mkdir(parents=True)
    gens = [{"output": f"o{i}", "reference": f"r{i}"} for i in range(3)]
    (runs / "s0" / "metrics.json").write_text(json.dumps({"outputs": {"generations": gens}}))
    shown = sample_generations(out.results.assign(eval_stage=stages), runs, n=2)
    assert shown[["example", "output"]].values.tolist() == [[0, "o0"], [1, "o1"]]
    assert sample_generations(out.results.assign(eval_stage="none"), runs).empty


@pytest.mark.filterwarnings("ignore::pandas.errors.PerformanceWarning")  # the set-up fragments on purpose
def test_plot_metrics_wide_results_draw_without_warnings():
    """A study's results frame has one column per stage parameter (hundreds, added one by one):
    the plot must not print pandas' fragmentation warning into the rendered report."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    from ptqlib.report.analysis import plot_metrics

    res = pd.DataFrame({"pipeline": ["a[seed=0]", "a[seed=1]", "b[seed=0]", "b[seed=1]"],
                        "field_f1": [0.8, 0.82, 0.6, 0.62]})
    for i in range(120):  # fragmented as results.csv's frame is after the report adds columns
        res[f"p{i}"] = i
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = plot_metrics(res, ["field_f1", "ppl"])
    assert fig is not None and len(fig.axes) == 1  # ppl is absent: one panel
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels == ["a", "b"]


def test_windows_of_one_document_are_one_cluster():
    """Perplexity units with a ``doc``: the statistic is unchanged (a ratio of sums), the interval
    counts documents, and a document-level shift shared by its windows widens the interval."""
    rng = np.random.default_rng(5)
    n_docs, per = 8, 16
    doc = np.repeat(np.arange(n_docs), per)
    shift = np.repeat(rng.normal(0, 0.3, n_docs), per)  # a per-document effect on b - a

    def units(with_doc):
        rows = []
        for fam, extra in (("a", 0.0), ("b", 1.0)):
            for seed in range(3):
                nll = 200 + rng.normal(0, 2, n_docs * per) + (extra * (5 + 40 * shift))
                rows += [{"pipeline": f"{fam}[seed={seed}]", "family": fam, "seed": seed, "group": "ppl", "unit": i,
                          "nll": v, "tokens": 63.0, **({"doc": float(d)} if with_doc else {})}
                         for i, (v, d) in enumerate(zip(nll, doc))]
        return pd.DataFrame(rows)

    u = units(True)
    res = pd.DataFrame([{"pipeline": f"{f}[seed={s}]", "family": f, "model": "m", "seed": s, "status": "ok",
                         "stages": "finetune(lora) -> evaluate", "ppl": 1.0} for f in "ab" for s in range(3)])
    clustered = check_claims(claim(">", metric="ppl"), res, u).iloc[0]
    flat = check_claims(claim(">", metric="ppl"), res, u.drop(columns="doc")).iloc[0]
    assert clustered["difference"] == pytest.approx(flat["difference"], rel=1e-12)
    assert clustered["n_examples"] == n_docs and flat["n_examples"] == n_docs * per
    assert clustered["ci_high"] - clustered["ci_low"] > 1.5 * (flat["ci_high"] - flat["ci_low"])


def test_a_clustered_mean_reports_the_mean_of_its_examples():
    """Task examples grouped by ``doc`` (documents of unequal size, as in stdlib-docstrings): the claim's
    mean_a / mean_b / mean_ref are the examples' means, as without the documents, not sums per document
    divided by the number of documents."""
    rng = np.random.default_rng(7)
    doc = np.repeat(np.arange(6), [1, 2, 3, 5, 8, 13])  # 32 examples in 6 documents
    vals = {"a": rng.uniform(0.2, 0.5, (3, len(doc))), "b": rng.uniform(0.0, 0.3, (3, len(doc))),
            "r": rng.uniform(0.5, 0.9, (3, len(doc)))}
    units = pd.DataFrame([{"pipeline": f"{f}[seed={s}]", "family": f, "seed": s, "group": "task", "unit": i,
                           "doc": float(d), "rouge_l": v} for f, per_seed in vals.items()
                          for s, row in enumerate(per_seed) for i, (v, d) in enumerate(zip(row, doc))])
    res = pd.DataFrame([{"pipeline": f"{f}[seed={s}]", "family": f, "model": "m", "seed": s, "status": "ok",
                         "stages": "finetune(lora) -> evaluate", "rouge_l": float(vals[f][s].mean())}
                        for f in vals for s in range(3)])
    for c in (claim(">", metric="rouge_l"), claim(">", metric="rouge_l", ref="r", min_effect=0.5)):
        clustered = check_claims(c, res, units).iloc[0]
        flat = check_claims(c, res, units.drop(columns="doc")).iloc[0]
        assert clustered["n_examples"] == 6 and flat["n_examples"] == len(doc)
        assert clustered["mean_a"] == pytest.approx(vals["a"].mean(), rel=1e-12)
        assert clustered["mean_b"] == pytest.approx(vals["b"].mean(), rel=1e-12)
        assert clustered["difference"] == pytest.approx(flat["difference"], rel=1e-12)
    assert clustered["mean_ref"] == pytest.approx(vals["r"].mean(), rel=1e-12)


def test_history_keeps_every_analysed_run(tmp_path):
    """history.csv gains one row per claim for each analysis that differs from the last (date, commit,
    machines, seeds, verdicts); repeating an analysis adds nothing."""
    from ptqlib.report.analysis import append_history, write_claims

    res, units = records(np.clip(BASE + 0.05 + NOISE, 0, 1), BASE)
    res["machines"] = "AMD EPYC 9R14 (cpu, 2 threads)"
    write_claims(claim(">") + claim(">", min_effect=0.2), res, units, tmp_path)
    first = pd.read_csv(tmp_path / "history.csv")
    assert len(first) == 2 and set(first.columns) >= {"date", "commit", "machines", "seeds", "claim", "verdict_holm"}
    assert first.seeds.astype(str).tolist() == ["0 1 2"] * 2 and first.machines[0] == "AMD EPYC 9R14 (cpu, 2 threads)"
    table = write_claims(claim(">") + claim(">", min_effect=0.2), res, units, tmp_path)  # the same analysis again
    assert len(pd.read_csv(tmp_path / "history.csv")) == 2
    res2 = res.assign(machines="Intel(R) Xeon(R) Platinum 8488C (cpu, 2 threads)")
    assert append_history(table, res2, tmp_path)  # another machine: a run of its own
    hist = pd.read_csv(tmp_path / "history.csv")
    assert len(hist) == 4 and hist.machines.nunique() == 2
    # rows kept from an older report carry no machine: the history says so, as the backfilled rows do
    assert append_history(table, res.drop(columns="machines"), tmp_path)
    assert pd.read_csv(tmp_path / "history.csv").machines.iloc[-1] == "not recorded"


def test_machines_note_warns_when_stages_ran_on_more_than_one():
    from ptqlib.report.analysis import machines_note

    one = pd.DataFrame({"pipeline": ["a", "b"], "machines": ["AMD EPYC (cpu, 2 threads)"] * 2})
    assert machines_note(one) == "Every stage ran on AMD EPYC (cpu, 2 threads)."
    two = one.assign(machines=["AMD EPYC (cpu, 2 threads)", "Intel Xeon (cpu, 2 threads) | AMD EPYC (cpu, 2 threads)"])
    note = machines_note(two)
    assert note.startswith("**The stages ran on more than one machine**") and "- AMD EPYC (cpu, 2 threads): a" in note


def test_the_models_note_names_each_models_licence():
    """Every embedded model has its licence, and a report over Gemma 3 names the Gemma terms (issue 43)."""
    from ptqlib.models import EMBEDDED, LICENCES
    from ptqlib.report.analysis import models_note

    assert set(LICENCES) == set(EMBEDDED)
    res = pd.DataFrame({"pipeline": ["a", "b", "c", "d"],
                        "model": ["smollm2-135m", "gemma3-270m", "gemma3-270m", "<b>org/model</b>"]})
    note = models_note(res)
    assert note.startswith("**Models**") and len(note.splitlines()) == 4  # the heading and each model once
    assert "`gemma3-270m`" in note and "Gemma Terms of Use" in note and "Apache 2.0" in note
    assert "&lt;b&gt;org/model&lt;/b&gt;: not embedded" in note and "<b>" not in note
    assert models_note(res.drop(columns="model")) == ""


def test_notes_show_pipeline_names_as_text():
    from ptqlib.report.analysis import machines_note, versions_note

    res = pd.DataFrame({"pipeline": ["<script>alert(1)</script>", "b"], "machines": ["m1", "m2"], "versions": ["v1", "v2"]})
    for note in (machines_note(res), versions_note(res)):
        assert "<script>" not in note and "&lt;script&gt;" in note


def test_a_study_without_claims_keeps_no_stale_claims(tmp_path):
    from ptqlib.report.analysis import drop_claims, write_claims

    res, units = records(np.clip(BASE + 0.05 + NOISE, 0, 1), BASE)
    write_claims(claim(">"), res, units, tmp_path)
    (tmp_path / "plan.csv").write_text("claim\nx\n")
    assert sorted(drop_claims(tmp_path)) == ["claims.csv", "plan.csv"]
    assert not (tmp_path / "claims.csv").exists() and (tmp_path / "history.csv").exists()
    assert drop_claims(tmp_path) == []


def test_an_exploratory_claim_is_decided_outside_the_holm_family():
    """Declared exploratory: its own verdict stands beside the others', it gets no adjusted p, and the confirmatory
    claims are adjusted as if it were not there; the findings count it and leave it out of the decided table."""
    from ptqlib.report.findings import counts_line, decided_rows

    res, units = records(np.clip(BASE + 0.05 + NOISE, 0, 1), BASE)
    alone = check_claims(claim(">"), res, units)
    both = check_claims(claim(">") + [{**claim(">")[0], "claim": "c again", "exploratory": True}], res, units)
    assert both["p_holm"][0] == alone["p_holm"][0]  # the family is the confirmatory claim alone
    assert np.isnan(both["p_holm"][1]) and both["verdict"][1] == "holds"
    assert both["verdict_holm"][1] == "holds (exploratory: outside Holm)"
    assert "2 claims (1 exploratory, outside Holm); 2 tested" in counts_line("s", both, "x.html")
    assert len(decided_rows("s", both)) == 1

"""Claim verdicts on synthetic records whose truth is known: paired bootstrap over seeds and examples."""
import math

import numpy as np
import pandas as pd
import pytest

from ptqlib.analysis import check_claims, decide, mean_pm, paired_bootstrap, summarise
from ptqlib.metrics import Statistic


def results(a_vals, b_vals, metric="field_f1", trains=True):
    rows = []
    for fam, vals in (("a", a_vals), ("b", b_vals)):
        for seed, v in enumerate(vals):
            rows.append({"pipeline": f"{fam}[seed={seed}]", "family": fam, "model": "m", "seed": seed,
                         "stages": "finetune(lora) -> evaluate" if trains else "evaluate", metric: v, "status": "ok"})
    return pd.DataFrame(rows)


def records(per_seed_a, per_seed_b, col="field_f1", group="task"):
    """results + units for families a and b; per_seed_*: one list of per-example values per seed."""
    rows, units = [], []
    for fam, seeds in (("a", per_seed_a), ("b", per_seed_b)):
        for seed, vals in enumerate(seeds):
            rows.append({"pipeline": f"{fam}[seed={seed}]", "family": fam, "model": "m", "seed": seed,
                         "stages": "finetune(lora) -> evaluate", col: float(np.mean(vals)), "status": "ok"})
            units += [{"pipeline": f"{fam}[seed={seed}]", "family": fam, "seed": seed, "group": group, "unit": i,
                       col: v} for i, v in enumerate(vals)]
    return pd.DataFrame(rows), pd.DataFrame(units)


def claim(relation=">", metric="field_f1", **kw):
    return [{"claim": "c", "a": "a", "b": "b", "metric": metric, "relation": relation, **kw}]


RNG = np.random.default_rng(1)
BASE = RNG.uniform(0.3, 0.9, size=(2, 128)).round(3)  # two seeds x 128 examples


def test_identical_pipelines_are_undecided():
    res, units = records(BASE, BASE)
    t = check_claims(claim(">"), res, units)
    assert t.loc[0, "difference"] == 0 and t.loc[0, "ci_low"] == 0 and t.loc[0, "ci_high"] == 0
    assert t.loc[0, "verdict"].startswith("undecided")
    assert check_claims(claim(">="), res, units).loc[0, "verdict"].startswith("undecided")  # no margin: cannot tell
    assert check_claims(claim("==", min_effect=0.01), res, units).loc[0, "verdict"] == "holds"


def test_clear_shift_is_decided_both_ways():
    res, units = records(np.clip(BASE + 0.1, 0, 1), BASE)
    t = check_claims(claim(">"), res, units)
    assert t.loc[0, "verdict"] == "holds" and 0 < t.loc[0, "ci_low"] < t.loc[0, "difference"] < t.loc[0, "ci_high"]
    assert t.loc[0, "n_examples"] == 128 and t.loc[0, "n_seeds"] == 2
    res, units = records(BASE, np.clip(BASE + 0.1, 0, 1))
    assert check_claims(claim(">"), res, units).loc[0, "verdict"] == "does not hold"
    assert check_claims(claim(">="), res, units).loc[0, "verdict"] == "does not hold"
    assert check_claims(claim("=="), res, units).loc[0, "verdict"] == "does not hold"


def test_one_example_difference_on_128_does_not_decide():
    a = BASE[:1].copy()
    a[0, 5] = min(1.0, a[0, 5] + 1.0)  # one example better, the other 127 equal
    res, units = records(a, BASE[:1])
    t = check_claims(claim(">"), res, units)
    assert t.loc[0, "difference"] > 0 and t.loc[0, "ci_low"] == 0
    assert t.loc[0, "verdict"].startswith("undecided")


def test_min_effect_is_the_boundary():
    res, units = records(np.clip(BASE + 0.03, 0, 1), BASE)
    assert check_claims(claim(">"), res, units).loc[0, "verdict"] == "holds"
    assert check_claims(claim(">", min_effect=0.2), res, units).loc[0, "verdict"] == "does not hold"
    res, units = records(np.clip(BASE - 0.005, 0, 1), BASE)  # a hair worse: non-inferior at a 0.05 margin
    assert check_claims(claim(">=", min_effect=0.05), res, units).loc[0, "verdict"] == "holds"
    assert check_claims(claim("==", min_effect=0.05), res, units).loc[0, "verdict"] == "holds"


def test_seed_disagreement_widens_the_interval():
    """Seed 0 says a >> b, seed 1 says a << b: resampling seeds must keep the claim undecided,
    although every example-level interval within one seed would decide it."""
    a = np.stack([np.clip(BASE[0] + 0.3, 0, 1), np.clip(BASE[1] - 0.3, 0, 1)])
    res, units = records(a, BASE)
    t = check_claims(claim(">"), res, units)
    assert t.loc[0, "verdict"].startswith("undecided") and t.loc[0, "ci_low"] < 0 < t.loc[0, "ci_high"]
    assert t.loc[0, "seed_sd"] > 0.3


def test_single_run_pairs_with_every_seed():
    res, units = records(np.clip(BASE + 0.2, 0, 1), BASE[:1])  # b does not train: one run
    t = check_claims(claim(">"), res, units)
    assert t.loc[0, "n_seeds"] == 2 and t.loc[0, "verdict"] == "holds"


def test_perplexity_from_windows_lower_is_better():
    nll_b = RNG.uniform(700, 900, size=(2, 64))
    rows, units = [], []
    for fam, nll in (("a", nll_b - 60), ("b", nll_b)):
        for s in range(2):
            rows.append({"pipeline": f"{fam}[seed={s}]", "family": fam, "seed": s, "stages": "finetune",
                         "ppl": math.exp(nll[s].sum() / (255 * 64)), "status": "ok"})
            units += [{"pipeline": f"{fam}[seed={s}]", "family": fam, "seed": s, "group": "ppl", "unit": i,
                       "nll": v, "tokens": 255.0} for i, v in enumerate(nll[s])]
    res, units = pd.DataFrame(rows), pd.DataFrame(units)
    t = check_claims(claim(">", metric="ppl"), res, units)
    assert t.loc[0, "difference"] < 0 and t.loc[0, "ci_high"] < 0 and t.loc[0, "verdict"] == "holds"
    # the pooled statistic is exp(total NLL / total tokens), as the evaluate stage computes it
    assert t.loc[0, "mean_b"] == pytest.approx(math.exp(nll_b.sum() / (255 * 128)))


def test_micro_averaged_ratio_is_resampled_as_a_ratio():
    st = Statistic("task", "fact_sup", "fact_pred")
    num = np.array([[1.0, 9.0]]), np.array([[10.0, 10.0]])
    d, lo, hi = paired_bootstrap(num[0], num[1], num[1] * 0.5, num[1], st, n_boot=500)
    assert d == pytest.approx(10 / 20 - 0.5) and lo <= d <= hi


def test_bootstrap_is_reproducible_and_has_the_normal_width():
    noise = np.random.default_rng(2).normal(0.05, 0.1, size=BASE.shape)
    res, units = records(BASE + noise, BASE)
    t1, t2 = check_claims(claim(), res, units), check_claims(claim(), res, units)
    assert t1.loc[0, "ci_low"] == t2.loc[0, "ci_low"] and t1.loc[0, "ci_high"] == t2.loc[0, "ci_high"]
    lo, d, hi = t1.loc[0, "ci_low"], t1.loc[0, "difference"], t1.loc[0, "ci_high"]
    assert d == pytest.approx(noise.mean()) and lo < d < hi
    normal = 2 * 1.96 * noise.std() / math.sqrt(noise.size)  # iid noise: the textbook interval width
    assert 0.7 * normal < hi - lo < 1.6 * normal


@pytest.mark.parametrize("a, b, relation, verdict", [
    ([0.80, 0.82], [0.50, 0.52], ">", "holds"),
    ([0.50, 0.52], [0.80, 0.82], ">", "does not hold"),
    ([0.50, 0.60], [0.52, 0.58], ">", "undecided (interval contains the boundary)"),
    ([0.40, 0.41], [0.80, 0.82], ">=", "does not hold"),
    ([0.8], [0.5], ">", "undecided (needs >= 2 seeds)"),
])
def test_run_level_metrics_resample_seeds(a, b, relation, verdict):
    """Without per-example units (size, speed, train loss) the interval comes from the seeds alone."""
    t = check_claims(claim(relation), results(a, b))
    assert t.loc[0, "verdict"] == verdict and t.loc[0, "n_examples"] == 0


def test_prefixed_lower_is_better_metric():
    df = results([0.1, 0.12], [0.9, 0.95], metric="finetune.train_loss_last")
    t = check_claims(claim(">", metric="finetune.train_loss_last"), df)
    assert t.loc[0, "verdict"] == "holds"


def test_deterministic_pipelines_decide_run_level_metrics():
    df = results([0.7], [0.5], trains=False)  # no training: one run is the whole distribution
    t = check_claims(claim(">"), df)
    assert t.loc[0, "seed_sd"] == 0 and t.loc[0, "verdict"] == "holds"


def test_decide_rejects_unknown_relation():
    with pytest.raises(ValueError, match="'<'"):
        decide("<", 0.0, 1.0)


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
    from ptqlib.analysis import settings_table

    t = settings_table(_chain_results())
    assert t.loc["ft_nf4_qlora", "stages"] == (
        "finetune(full: lr 5e-05, steps 20, batch_size 4) -> quantize(nf4: blocksize 64, double_quant True) -> "
        "finetune(qlora: lr 0.0002, steps 10, rank 16, alpha 32) -> evaluate")
    assert t.loc["ft_nf4_qlora", "seeds"] == "0, 1" and t.loc["base", "stages"] == "evaluate"


def test_cost_table_keeps_each_fine_tuning():
    from ptqlib.analysis import cost_table

    t = cost_table(_chain_results())
    assert t.loc["ft_nf4_qlora", "finetune (s)"] == pytest.approx(100.5)  # mean over seeds
    assert t.loc["ft_nf4_qlora", "finetune2 (s)"] == 50.0 and t.loc["ft_nf4_qlora", "total (s)"] == 190.5
    assert t.loc["base", "evaluate (s)"] == 40.0 and math.isnan(t.loc["base", "finetune (s)"])


def test_notebook_outputs_are_written_and_read_back(tmp_path):
    """What 04_analyse writes (summary.csv, claims.csv) and reads (results, units, records)."""
    import json

    from ptqlib.analysis import load_outputs, sample_generations, write_claims, write_summary

    res, units = records(BASE + 0.2, BASE)
    with pytest.raises(FileNotFoundError, match="no results.csv"):
        load_outputs(tmp_path)
    res.assign(eval_stage=["s0", "s1", "s2", "s3"]).to_csv(tmp_path / "results.csv", index=False)
    units.to_csv(tmp_path / "units.csv", index=False)
    (tmp_path / "study.json").write_text(json.dumps({"claims": claim(">")}))
    out = load_outputs(tmp_path)
    assert len(out.results) == 4 and len(out.units) == 4 * 128 and out.stages == {}
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
    shown = sample_generations(out.results.assign(eval_stage=["s0", "s1", "s2", "s3"]), runs, n=2)
    assert shown[["example", "output"]].values.tolist() == [[0, "o0"], [1, "o1"]]
    assert sample_generations(out.results.assign(eval_stage="none"), runs).empty


@pytest.mark.filterwarnings("ignore::pandas.errors.PerformanceWarning")  # the set-up fragments on purpose
def test_plot_metrics_wide_results_draw_without_warnings():
    """A study's results frame has one column per stage parameter (hundreds, added one by one):
    the plot must not print pandas' fragmentation warning into the rendered report."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    from ptqlib.analysis import plot_metrics

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

"""Claim verdicts on synthetic results where the right answer is known."""
import pandas as pd
import pytest

from ptqlib.analysis import check_claims, mean_pm, summarise


def results(a_vals, b_vals, metric="field_f1", trains=True):
    rows = []
    for fam, vals in (("a", a_vals), ("b", b_vals)):
        for seed, v in enumerate(vals):
            rows.append({"pipeline": f"{fam}[seed={seed}]", "family": fam, "model": "m", "seed": seed,
                         "stages": "finetune(lora) -> evaluate" if trains else "evaluate", metric: v, "status": "ok"})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("a, b, relation, verdict", [
    ([0.80, 0.82], [0.50, 0.52], ">", "holds"),
    ([0.50, 0.52], [0.80, 0.82], ">", "does not hold"),
    ([0.50, 0.60], [0.52, 0.58], ">", "undecided (within noise)"),
    ([0.50, 0.60], [0.52, 0.58], ">=", "holds"),
    ([0.40, 0.41], [0.80, 0.82], ">=", "does not hold"),
    ([0.50, 0.60], [0.52, 0.58], "==", "holds"),
    ([0.10, 0.11], [0.80, 0.81], "==", "does not hold"),
    ([0.8], [0.5], ">", "undecided (needs >= 2 seeds)"),
])
def test_verdicts(a, b, relation, verdict):
    t = check_claims([{"claim": "c", "a": "a", "b": "b", "metric": "field_f1", "relation": relation}], results(a, b))
    assert t.loc[0, "verdict"] == verdict


def test_lower_is_better_metric_flips_sign():
    df = results([10.0, 10.2], [20.0, 20.4], metric="ppl")
    t = check_claims([{"claim": "a has lower ppl", "a": "a", "b": "b", "metric": "ppl", "relation": ">"}], df)
    assert t.loc[0, "verdict"] == "holds" and t.loc[0, "difference"] < 0


def test_prefixed_lower_is_better_metric():
    df = results([0.1, 0.12], [0.9, 0.95], metric="finetune.train_loss_last")
    t = check_claims([{"claim": "a fits better", "a": "a", "b": "b", "metric": "finetune.train_loss_last",
                       "relation": ">"}], df)
    assert t.loc[0, "verdict"] == "holds"


def test_deterministic_pipelines_have_zero_spread():
    df = results([0.7], [0.5], trains=False)  # no training: one run is the whole distribution
    t = check_claims([{"claim": "c", "a": "a", "b": "b", "metric": "field_f1", "relation": ">"}], df)
    assert t.loc[0, "spread"] == 0 and t.loc[0, "verdict"] == "holds"


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

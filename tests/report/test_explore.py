"""The exploration helpers of notebook 04 and the stage notebooks (ptqlib.report.explore)."""
import matplotlib
import pandas as pd
import pytest

from ptqlib.report import explore

matplotlib.use("Agg")


def _units():
    rows = []
    for fam, seeds, scores in (("a", (0, 1), [[1.0, 0.5, 0.0, 0.2], [1.0, 0.7, 0.0, 0.2]]),
                               ("b", (0,), [[0.0, 0.6, 0.5, 0.2]])):
        for s, vals in zip(seeds, scores):
            rows += [{"pipeline": f"{fam}[seed={s}]", "family": fam, "seed": s, "group": "task", "unit": i,
                      "field_f1": v} for i, v in enumerate(vals)]
    rows.append({"pipeline": "a[seed=0]", "family": "a", "seed": 0, "group": "ppl", "unit": 0, "nll": 3.0})
    return pd.DataFrame(rows)


def test_flips_counts_each_example_once_over_the_seeds_means():
    counts, per = explore.flips(_units(), "a", "b")
    assert counts == {"a better": 1, "b better": 1, "equal": 2}  # example 1: 0.6 vs 0.6; example 3: 0.2 vs 0.2
    assert list(per.index) == [0, 1, 3, 2] and per.loc[0, "difference"] == 1.0 and per.loc[2, "difference"] == -0.5
    with pytest.raises(ValueError, match=r"no task units for 'c'"):
        explore.flips(_units(), "a", "c")


def test_plot_claims_draws_one_panel_per_decided_claim_with_its_boundaries():
    table = pd.DataFrame([
        {"claim": "x beats y", "metric": "field_f1", "relation": ">", "min_effect": 0.0, "difference": 0.05,
         "ci_low": 0.01, "ci_high": 0.09, "verdict": "holds", "verdict_holm": "holds"},
        {"claim": "x as good as y", "metric": "ppl", "relation": "==", "min_effect": 0.5, "difference": -0.1,
         "ci_low": -0.3, "ci_high": 0.2, "verdict": "holds", "verdict_holm": "holds"},
        {"claim": "no data", "metric": "field_f1", "relation": ">", "min_effect": 0.0, "difference": float("nan"),
         "ci_low": float("nan"), "ci_high": float("nan"), "verdict": "undecided (no data)", "verdict_holm": ""}])
    fig = explore.plot_claims(table)
    assert len(fig.axes) == 2  # the claim without a difference is left out
    dashed = [sorted(ln.get_xdata()[0] for ln in ax.get_lines() if ln.get_linestyle() == "--") for ax in fig.axes]
    assert dashed == [[0.0], [-0.5, 0.5]]  # '>': its boundary; '==': both sides of the margin
    assert explore.plot_claims(table.iloc[2:]) is None


def test_run_dir_finds_a_stage_of_a_pipeline_and_names_what_is_valid(tmp_path):
    from ptqlib.engine.runner import Runner
    from ptqlib.study.schema import load_study

    f = tmp_path / "parameters" / "s.yaml"
    f.parent.mkdir()
    f.write_text("model: tiny\nseeds: [0, 1]\npipelines:\n  q: [{finetune: full}, {quantize: rtn}]\n")
    chains = Runner(load_study(f), tmp_path / "runs", tmp_path / "reports").chains
    ft, q, ev = chains["q[seed=1]"]
    assert explore.run_dir(f, "q[seed=1]", runs=tmp_path / "runs") == tmp_path / "runs" / ev
    assert explore.run_dir(f, "q[seed=1]") == (tmp_path / "runs" / ev).resolve()  # runs/ beside parameters/
    assert explore.run_dir(f, "q[seed=1]", "finetune", runs=tmp_path / "runs") == tmp_path / "runs" / ft
    with pytest.raises(ValueError, match=r"pipeline 'q' is not in .*; valid: q\[seed=0\], q\[seed=1\]"):
        explore.run_dir(f, "q", runs=tmp_path / "runs")
    with pytest.raises(ValueError, match=r"has no lmeval stage; its stages: evaluate, finetune, quantize"):
        explore.run_dir(f, "q[seed=0]", "lmeval", runs=tmp_path / "runs")

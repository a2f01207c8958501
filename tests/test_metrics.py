import math

import pandas as pd
import pytest

from ptqlib.metrics import exact_match, fact_counts, facts, field_f1, rouge_l, task_scores

SRC = "Priya: Northwind Traders wants 120 units at $410 per unit by 14 March."
REF = "customer: Northwind Traders\nquantity: 120\nunit_price: 410"


def test_exact_match_and_field_f1():
    assert exact_match(REF, REF) == 1.0 and field_f1(REF, REF) == 1.0
    assert exact_match("customer: northwind   traders\nquantity: 120\nunit_price: 410", REF) == 1.0
    wrong = REF.replace("410", "450")
    assert exact_match(wrong, REF) == 0.0
    assert math.isclose(field_f1(wrong, REF), 2 / 3)
    extra = REF + "\nowner: Marco"  # one spurious field: precision 3/4, recall 1
    assert math.isclose(field_f1(extra, REF), 2 * 0.75 / 1.75)
    assert field_f1("", REF) == 0.0 and exact_match("", REF) == 0.0


def test_rouge_l():
    assert rouge_l(REF, REF) == 1.0
    assert rouge_l("", REF) == 0.0
    assert 0 < rouge_l("customer: Northwind", REF) < 1


def test_facts_and_invented_numbers():
    assert {"northwind traders", "120", "410", "priya", "14", "march"} <= facts(SRC)
    n_pred, n_sup, n_ref, n_kept = fact_counts(REF, SRC, REF)
    assert n_pred == n_sup == 3 and n_ref == n_kept == 3
    invented = REF.replace("120", "999")
    n_pred, n_sup, _, n_kept = fact_counts(invented, SRC, REF)
    assert (n_pred, n_sup, n_kept) == (3, 2, 2)
    assert fact_counts("", SRC, REF) == (0, 0, 3, 0)


def test_task_scores_micro_averages():
    s = task_scores([REF, ""], [REF, REF], [SRC, SRC])
    assert s["exact_match"] == 0.5 and s["empty_outputs"] == 0.5
    assert s["fact_precision"] == 1.0  # the empty output invents nothing
    assert s["fact_recall"] == 0.5  # ... and keeps nothing
    assert math.isnan(task_scores([""], [""], [""])["fact_precision"])
    assert task_scores([], [], []) == {}


def test_example_scores_aggregate_to_task_scores():
    """The per-example columns the bootstrap resamples give back the stage's own aggregates."""
    from ptqlib.metrics import example_scores, task_statistics

    preds = [REF, "", REF.replace("120", "12"), "customer: x"]
    refs, srcs = [REF] * 4, [SRC] * 4
    cols, agg = example_scores(preds, refs, srcs), task_scores(preds, refs, srcs)
    for name, st in task_statistics().items():
        den = cols[st.den] if st.den else None
        assert st(cols[st.num], den) == pytest.approx(agg[name]), name
    assert len(cols["field_f1"]) == 4 and cols["field_f1"][0] == 1.0 and cols["field_f1"][1] == 0.0


@pytest.mark.parametrize("metric", ["quantize.quant_seconds", "gen_seconds", "ppl_seconds", "ttft_s", "load_seconds",
                                    "peak_rss_mb", "finetune.train_seconds", "size_mb_deploy", "ppl", "kl_stdlib"])
def test_times_sizes_and_losses_are_lower_is_better(metric):
    from ptqlib.metrics import lower_is_better

    assert lower_is_better(metric)
    assert not lower_is_better("gen_tokens_per_s") and not lower_is_better("field_f1")


def test_a_faster_quantizer_holds_as_faster():
    """'RTN quantizes faster than GPTQ' (0.36 s vs 4.74 s, one run each: pipelines that do not train) holds;
    scored as higher-is-better it said "does not hold"."""
    import pandas as pd

    from ptqlib.report.claims import check_claims

    results = pd.DataFrame([
        {"pipeline": "q_rtn", "family": "q_rtn", "seed": 0, "status": "ok", "stages": "quantize(rtn) -> evaluate",
         "quantize.quant_seconds": 0.36},
        {"pipeline": "q_gptq", "family": "q_gptq", "seed": 0, "status": "ok", "stages": "quantize(gptq) -> evaluate",
         "quantize.quant_seconds": 4.74}])
    claim = {"claim": "RTN quantizes faster than GPTQ", "a": "q_rtn", "b": "q_gptq",
             "metric": "quantize.quant_seconds", "relation": ">"}
    row = check_claims([claim], results).iloc[0]
    assert row.verdict == "holds" and row.difference == pytest.approx(0.36 - 4.74)



def test_a_new_metric_is_one_register_call(monkeypatch):
    """Everything that asks about a metric reads the registry: toy metrics registered in ptqlib.metrics
    alone are known to selects and claims, ranked the right way, checked against what the evaluate stage
    records, flagged at a floor, scored per example and shown in the report's tables and plots."""
    from ptqlib import metrics
    from ptqlib.metrics import Metric, Statistic
    from ptqlib.report.analysis import summarise
    from ptqlib.report.claims import flags
    from ptqlib.study.selection import missing_metric, validation_params

    monkeypatch.setattr(metrics, "METRICS", dict(metrics.METRICS))
    metrics.register(Metric("toy_seconds", "a toy time", lower_is_better=True, shown="cost", plot="deployment",
                            needs="task"))
    metrics.register(Metric("toy_f1", "a toy score", Statistic("task", "field_f1"), bounded=True, shown="quality",
                            needs="task"))
    with pytest.raises(ValueError, match="'toy_f1' is registered twice"):
        metrics.register(Metric("toy_f1", "again"))
    assert metrics.known_evaluate_metric("toy_seconds") and metrics.known_evaluate_metric("toy_f1")
    assert metrics.lower_is_better("toy_seconds") and not metrics.lower_is_better("toy_f1")
    assert "toy_seconds" in metrics.shown("cost") and "toy_seconds" in metrics.plotted("deployment")
    assert "toy_f1" in metrics.shown("quality") and metrics.statistic("toy_f1").group == "task"
    assert metrics.task_scores(["a: 1"], ["a: 1"], ["a: 1"])["toy_f1"] == 1.0  # scored with the task metrics
    ev = {"task_samples": 0, "ppl_sources": ["pydoc"], "kl_reference": False, "speed_prompts": 0,
          "runtime": "torch", "lm_eval_tasks": []}
    assert missing_metric("toy_seconds", ev) == "its task_samples is 0 (no generation)"
    assert validation_params({**ev, "task_samples": 8}, "toy_f1")["ppl_sources"] == []  # only what ranks it
    assert flags({"metric": "toy_f1", "mean_a": 0.0, "mean_b": 0.5}) == "a at floor (toy_f1 0.000)"
    res = pd.DataFrame({"family": ["x", "x"], "model": ["m", "m"], "toy_f1": [0.5, 0.7], "toy_seconds": [1.0, 2.0]})
    assert {"toy_f1", "toy_seconds"} <= {c[0] for c in summarise(res).columns}


def test_task_score_reads_each_tasks_own_metric():
    """One name for a claim or selection over several tasks: field F1 where the references are fields, ROUGE-L
    elsewhere; read from what the stage recorded, never computed by it (records of before serve it too)."""
    from ptqlib.data import primary_metric
    from ptqlib.metrics import evaluate_metric_names, task_score, task_statistics

    assert [primary_metric(t) for t in ("meetings", "meetings-hard", "stdlib-docstrings", "jsonl:x.jsonl")] == \
        ["field_f1", "field_f1", "rouge_l", "rouge_l"]
    rec = {"field_f1": 0.75, "rouge_l": 0.25}
    assert task_score(rec, "meetings-hard") == 0.75 and task_score(rec, "stdlib-docstrings") == 0.25
    assert task_score({}, "meetings") is None
    assert "task_score" in evaluate_metric_names() and "task_score" not in task_statistics()

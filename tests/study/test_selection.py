"""Selection on the validation split (ptqlib.study.selection): the choice, its resolution into test-set
pipelines, the runner's two phases and the report's selection.csv, on fake stage records."""
import csv
import math
import re
import textwrap
import time

import pytest

from ptqlib.engine.executors import _Done
from ptqlib.engine.runner import Runner
from ptqlib.engine.stage import OK
from ptqlib.files import write_json_atomic
from ptqlib.report import tables as report
from ptqlib.study import selection
from ptqlib.study.schema import load_study

STUDY = """
study: sel
model: tiny
seeds: [0, 1]
defaults:
  finetune: {steps: 4, lr: {select: [1.0e-4, 3.0e-4, 1.0e-3], metric: field_f1}}
pipelines:
  base: []
  ft: [{finetune: full}]
claims:
  - {claim: fine-tuning helps, a: ft, b: base, metric: field_f1}
"""


def _study(tmp_path, text=STUDY):
    f = tmp_path / "s.yaml"
    f.write_text(textwrap.dedent(text))
    return load_study(f)


def _finish(runner: Runner, sid: str, metrics: dict) -> None:
    n = runner.nodes[sid]
    write_json_atomic(runner.runs / sid / "metrics.json", {
        "status": "ok", "kind": n.kind, "label": n.label(), "model": n.model, "params": n.params, "metrics": metrics,
        "timings": {"wall_s": 1.0, "started": time.time(), "finished": time.time()}})


@pytest.mark.parametrize("values, metric, best", [
    ([0.5, 0.7, 0.6], "field_f1", 1),  # higher is better
    ([0.7, 0.5, 0.7], "field_f1", 0),  # a tie goes to the first listed
    ([0.5, 0.7, 0.7], "field_f1", 1),
    ([30.0, 20.0, 25.0], "ppl", 1),  # perplexity: lower is better
    ([30.0, 20.0, 20.0], "ppl_stdlib", 1),
    ([120.0, 110.0], "size_mb_deploy", 1),
    ([math.nan, 0.2, 0.1], "field_f1", 1),  # NaN ranks last
    ([math.nan, math.nan], "ppl", 0),
])
def test_choose_picks_the_best_and_the_first_on_a_tie(values, metric, best):
    assert selection.choose(values, metric) == best


@pytest.mark.parametrize("values, metric, tie, best", [
    ([0.50, 0.58, 0.60], "field_f1", 0.0, 2),  # no margin: the best
    ([0.50, 0.58, 0.60], "field_f1", 0.02, 1),  # 0.58 is within 0.02 of 0.60: the first listed of the tied wins
    ([0.50, 0.58, 0.60], "field_f1", 0.1, 0),
    ([0.50, 0.58, 0.60], "field_f1", 0.019, 2),  # just outside the margin
    ([21.0, 20.5, 20.0], "ppl", 0.6, 1),  # lower is better: 20.5 is 0.5 worse than 20.0
    ([math.nan, 0.58, 0.60], "field_f1", 1.0, 1),  # NaN is never tied
])
def test_a_declared_tie_margin_gives_the_first_listed_of_the_tied(values, metric, tie, best):
    assert selection.choose(values, metric, tie) == best


def test_choose_waits_for_every_value():
    assert selection.choose([0.9, None, 0.1], "field_f1") is None


def test_resolve_adds_the_chosen_candidates_test_runs(tmp_path):
    study = _study(tmp_path)
    assert [p.name for p in study.pipelines] == ["base", "ft~select[lr=0.0001]", "ft~select[lr=0.0003]",
                                                 "ft~select[lr=0.001]"]
    values = {"ft~select[lr=0.0001]": 0.40, "ft~select[lr=0.0003]": 0.55, "ft~select[lr=0.001]": 0.50}
    partial = selection.resolve(study, lambda name, metric: values[name] if name.endswith("0001]") else None)
    assert partial.selections[0].chosen is None and len(partial.pipelines) == 4  # not all recorded: wait
    assert partial.selections[0].values == [0.40, None, None]
    done = selection.resolve(study, lambda name, metric: values[name])
    assert study.selections[0].chosen is None and len(study.pipelines) == 4  # the input is left as it was
    assert done.selections[0].chosen == 1 and done.selections[0].values == [0.40, 0.55, 0.50]
    assert [p.name for p in done.pipelines][4:] == ["ft[seed=0]", "ft[seed=1]"]
    assert [p.stages[0].params["lr"] for p in done.pipelines[4:]] == [3e-4, 3e-4]
    assert [p.stages[-1].params["split"] for p in done.pipelines[4:]] == ["test", "test"]
    assert selection.resolve(done, lambda *a: pytest.fail("a resolved selection is not read again")) is not None


def test_runner_reads_cached_choice_and_report_keeps_selection_out_of_results(tmp_path):
    study = _study(tmp_path)
    r = Runner(study, tmp_path / "runs", tmp_path / "reports")
    assert "ft[seed=0]" not in r.chains
    assert selection.waiting(r.study) == ["ft~select[lr=0.0001]", "ft~select[lr=0.0003]", "ft~select[lr=0.001]"]
    dry = r.describe()
    assert "ft: 2 test-set pipelines (seeds 0, 1) wait for the selection of lr in [0.0001, 0.0003, 0.001] by " \
           "field_f1 on the validation split (0 of 3 selection pipelines recorded)" in dry
    assert "then the stages of the test-set pipelines that wait for a selection" in dry
    for name, f1 in (("ft~select[lr=0.0001]", 0.2), ("ft~select[lr=0.0003]", 0.1), ("ft~select[lr=0.001]", 0.3)):
        ft, ev = r.chains[name]
        _finish(r, ft, {"train_loss_last": 1.0})
        _finish(r, ev, {"field_f1": f1})
    r = Runner(study, tmp_path / "runs", tmp_path / "reports")  # a second run: the choice from the cache
    assert selection.waiting(r.study) == []
    assert [p.stages[0].params["lr"] for p in r.study.pipelines if p.family == "ft"] == [1e-3, 1e-3]
    assert r.chains["ft[seed=0]"][0] == r.chains["ft~select[lr=0.001]"][0]  # the seed-0 training is shared
    dry = r.describe()
    assert "ft: lr = 0.001 chosen by field_f1 on the validation split (0.0001: 0.2, 0.0003: 0.1, 0.001: 0.3)" in dry
    assert "  ft[seed=1]: finetune(full, 4 steps, seed 1)" in dry
    assert r.selected(["ft"]) == [p for p in r.study.pipelines if p.family.startswith("ft")]
    assert [p.name for p in r.selected(["ft[seed=1]"])] == ["ft[seed=1]"]  # a grid name as it is
    report.write_results(r)
    rows = list(csv.DictReader(open(r.reports / "results.csv")))
    assert [x["pipeline"] for x in rows] == ["base", "ft[seed=0]", "ft[seed=1]"]  # no validation rows
    sel = list(csv.DictReader(open(r.reports / "selection.csv")))
    assert [(x["family"], x["key"], x["candidate"], x["metric"], x["validation"], x["chosen"]) for x in sel] == [
        ("ft", "lr", "0.0001", "field_f1", "0.2", "False"), ("ft", "lr", "0.0003", "field_f1", "0.1", "False"),
        ("ft", "lr", "0.001", "field_f1", "0.3", "True")]
    # without runs/ (a fresh clone), the choice comes from the report's selection.csv (same evaluate stage ids)
    fresh = Runner(study, tmp_path / "no-runs", tmp_path / "reports", reporter=report)
    assert [p.name for p in fresh.study.pipelines if p.family == "ft"] == ["ft[seed=0]", "ft[seed=1]"]
    assert Runner(study, tmp_path / "no-runs", tmp_path / "reports", keep_previous=False,
                  reporter=report).study.selections[0].chosen is None
    # the engine reads no report file: without a reporter the runs alone decide, and they are gone
    assert Runner(study, tmp_path / "no-runs", tmp_path / "reports").study.selections[0].chosen is None


class FakeExecutor:
    """Records what runs and writes an ok record at once; evaluate scores field_f1 = f(lr upstream)."""

    slots, local = 1, False

    def __init__(self, score):
        self.score, self.ran, self.runner = score, [], None

    def submit(self, node, force=False):
        self.ran.append(node)
        metrics = {}
        if node.kind == "evaluate" and node.input_id:
            lr = self.runner.nodes[node.input_id].params["lr"]
            metrics = {"field_f1": self.score(lr, node.params["split"])}
        _finish(self.runner, node.id, metrics)
        return _Done(OK)

    def close(self):
        pass


def test_run_selects_first_then_runs_the_chosen_test_pipelines(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "analyse", lambda runner, force=False: None)  # no report notebook here
    study = _study(tmp_path)
    ex = FakeExecutor(lambda lr, split: {1e-4: 0.3, 3e-4: 0.6, 1e-3: 0.4}[lr] if split == "validation" else 0.5)
    r = Runner(study, tmp_path / "runs", tmp_path / "reports", reporter=report)
    ex.runner = r
    assert r.run(executor=ex) == 0
    ex.runner = r  # (the runner rebuilt its graph; nodes are looked up through it)
    evals = [(n.params["split"], n.seed) for n in ex.ran if n.kind == "evaluate" and n.input_id]
    assert evals == [("validation", 0)] * 3 + [("test", 0), ("test", 1)]  # selection first
    trained = [(n.seed, n.params["lr"]) for n in ex.ran if n.kind == "finetune"]
    assert trained == [(0, 1e-4), (0, 3e-4), (0, 1e-3), (1, 3e-4)]  # the chosen seed-0 model is not trained again
    assert [p.stages[0].params["lr"] for p in r.study.pipelines if p.family == "ft"] == [3e-4, 3e-4]
    rows = {x["pipeline"]: x for x in csv.DictReader(open(r.reports / "results.csv"))}
    assert rows["ft[seed=1]"]["finetune.lr"] == "0.0003" and rows["ft[seed=1]"]["field_f1"] == "0.5"
    # a second run: nothing
    ex2 = FakeExecutor(ex.score)
    r2 = Runner(study, tmp_path / "runs", tmp_path / "reports")
    ex2.runner = r2
    assert r2.run(executor=ex2) == 0 and ex2.ran == []
    # forced: every stage once (the selection's are not run again with the test-set pipelines)
    ex3 = FakeExecutor(ex.score)
    r3 = Runner(study, tmp_path / "runs", tmp_path / "reports")
    ex3.runner = r3
    r3.run(force=True, executor=ex3)
    assert sorted(n.id for n in ex3.ran) == sorted({sid for c in r3.chains.values() for sid in c})


def test_the_tie_rule_decides_the_run_and_selection_csv_shows_it(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "analyse", lambda runner, force=False: None)
    study = _study(tmp_path, STUDY.replace("1.0e-3], metric: field_f1}", "1.0e-3], metric: field_f1, tie: 0.05}"))
    assert study.selections[0].tie == 0.05
    ex = FakeExecutor(lambda lr, split: {1e-4: 0.30, 3e-4: 0.58, 1e-3: 0.60}[lr] if split == "validation" else 0.5)
    r = Runner(study, tmp_path / "runs", tmp_path / "reports", reporter=report)
    ex.runner = r
    assert r.run(executor=ex) == 0
    assert [p.stages[0].params["lr"] for p in r.study.pipelines if p.family == "ft"] == [3e-4, 3e-4]
    sel = list(csv.DictReader(open(r.reports / "selection.csv")))
    assert [(x["candidate"], round(float(x["gap"]), 6), x["tie"], x["tied"], x["chosen"]) for x in sel] == [
        ("0.0001", 0.3, "0.05", "False", "False"), ("0.0003", 0.02, "0.05", "True", "True"),
        ("0.001", 0.0, "0.05", "True", "False")]
    dry = Runner(study, tmp_path / "runs", tmp_path / "reports").describe()
    assert "lr = 0.0003 chosen by field_f1" in dry and "tie margin 0.05: 0.0003, 0.001 tied, the first listed wins" in dry


def test_a_failed_selection_stage_holds_its_test_pipelines_back(tmp_path, monkeypatch, caplog):
    from ptqlib.engine.stage import FAILED

    monkeypatch.setattr(report, "analyse", lambda runner, force=False: None)
    r = Runner(_study(tmp_path), tmp_path / "runs", tmp_path / "reports", reporter=report)
    ex = FakeExecutor(lambda lr, split: 0.5)
    ex.runner = r
    submit = ex.submit

    def failing(node, force=False):  # the lr 3e-4 training fails
        if node.kind == "finetune" and node.params["lr"] == 3e-4:
            ex.ran.append(node)
            return _Done(FAILED)
        return submit(node, force)

    ex.submit = failing
    with caplog.at_level("ERROR"):
        assert r.run(executor=ex) == 1  # one failed stage, counted once over both phases
    assert "ft: no lr chosen (a selection pipeline did not finish): its test-set pipelines do not run" in caplog.text
    assert sum(n.kind == "finetune" and n.params["lr"] == 3e-4 for n in ex.ran) == 1  # not retried after the selection
    assert not any(n.kind == "evaluate" and n.params["split"] == "test" and n.input_id for n in ex.ran)
    assert [x["pipeline"] for x in csv.DictReader(open(r.reports / "results.csv"))] == ["base"]


@pytest.mark.parametrize("metric, sources, task_samples, kl", [
    ("field_f1", [], 16, False),  # a task statistic: generation only, no perplexity windows
    ("ppl_stdlib", ["stdlib"], 0, False),  # a perplexity: that source's windows only, no generation
    ("kl", ["pydoc"], 0, True),
])
def test_a_selection_evaluates_only_what_ranks_its_candidates(tmp_path, metric, sources, task_samples, kl):
    text = f"""
    study: sel
    model: tiny
    seeds: [0, 1]
    defaults:
      finetune: {{steps: 4, lr: {{select: [1.0e-4, 3.0e-4, 1.0e-3], metric: {metric}}}}}
      evaluate: {{task_samples: 16, speed_prompts: 2}}
    pipelines:
      ft: [{{quantize: nf4}}, {{finetune: qlora}}]
    """
    study = _study(tmp_path, text)
    sel_pls = [p for p in study.pipelines if selection.is_selection(p)]
    assert len(sel_pls) == 3
    for pl in sel_pls:
        ev = pl.stages[-1].params
        assert (ev["split"], ev["ppl_sources"], ev["task_samples"], ev["kl_reference"], ev["speed_prompts"]) == \
            ("validation", sources, task_samples, kl, 0)
    test_pls = [p for o in study.selections[0].options for p in o]  # the test-set runs measure everything
    assert all(p.stages[-1].params["ppl_sources"] == ["pydoc", "stdlib"] and p.stages[-1].params["speed_prompts"] == 2
               for p in test_pls)


def test_an_evaluate_stage_that_measures_nothing_is_refused(tmp_path):
    from ptqlib.study.params import ConfigError, EvaluateParams

    EvaluateParams(ppl_sources=[], task_samples=8)  # generation only is fine
    with pytest.raises(ConfigError, match="measures nothing"):
        EvaluateParams(ppl_sources=[], task_samples=0)


@pytest.mark.parametrize("pipeline, metric, evaluate, why", [
    ("[{finetune: full}]", "kl", "{}", "no 16-bit reference"),  # nothing quantizes: no KL
    ("[{finetune: full}]", "top1_agree_stdlib", "{}", "no 16-bit reference"),
    ("[{quantize: nf4}, {finetune: qlora}]", "kl_stdlib", "{ppl_sources: [pydoc]}", "lack 'stdlib'"),
    ("[{finetune: full}]", "gen_seconds", "{task_samples: 0}", "task_samples is 0"),
    ("[{finetune: full}]", "lmeval.arc_easy.acc", "{lm_eval_tasks: [hellaswag]}", "lack 'arc_easy'"),
])
def test_a_select_on_a_metric_that_is_never_recorded_is_refused(tmp_path, pipeline, metric, evaluate, why):
    """Every candidate would score NaN and the first would be 'chosen' silently: refused at load instead."""
    from ptqlib.errors import ConfigError

    text = f"""
    study: sel
    model: tiny
    defaults:
      finetune: {{steps: 4, lr: {{select: [1.0e-4, 3.0e-4], metric: {metric}}}}}
      evaluate: {evaluate}
    pipelines:
      ft: {pipeline}
    """
    with pytest.raises(ConfigError, match=f"{re.escape(metric)}'? is not recorded .*{re.escape(why)}"):
        _study(tmp_path, text)


def test_an_old_reports_values_of_another_metric_are_not_reused(tmp_path):
    """selection.csv from a run that ranked by exact_match; the study now ranks by field_f1 and its runs are
    gone: the old numbers do not stand in for the new metric (same evaluate stage ids)."""
    from ptqlib.engine.choices import recorded

    study = _study(tmp_path)
    r = Runner(study, tmp_path / "runs", tmp_path / "reports", reporter=report)
    sel = [p for p in study.pipelines if selection.is_selection(p)]
    r.reports.mkdir(parents=True, exist_ok=True)
    rows = ["family,point,key,candidate,metric,validation,chosen,pipeline,eval_stage"] + [
        f"ft,,lr,{i},exact_match,0.{i + 1},False,{p.name},{r.chains[p.name][-1]}" for i, p in enumerate(sel)]
    (r.reports / "selection.csv").write_text("\n".join(rows) + "\n")
    value_of = recorded(r)
    assert value_of(sel[0].name, "exact_match") == pytest.approx(0.1)
    assert value_of(sel[0].name, "field_f1") is None  # not known: its selection stages run again


def test_a_selection_csv_with_a_bad_value_is_refused_naming_it(tmp_path, capsys):
    from ptqlib.cli import main

    study = _study(tmp_path)
    r = Runner(study, tmp_path / "runs", tmp_path / "reports")
    sel = next(p for p in study.pipelines if selection.is_selection(p))
    (r.reports).mkdir(parents=True, exist_ok=True)
    (r.reports / "selection.csv").write_text("family,point,key,candidate,metric,validation,chosen,pipeline,eval_stage\n"
                                             f"ft,,lr,0,field_f1,high,False,{sel.name},{r.chains[sel.name][-1]}\n")
    code = main(["run", str(tmp_path / "s.yaml"), "--dry-run", "--runs", str(tmp_path / "runs"),
                 "--reports", str(tmp_path / "reports")])
    err = capsys.readouterr().err
    assert code == 2 and "selection.csv" in err and "not a number" in err and "Traceback" not in err


def test_a_select_on_a_task_without_a_validation_split_is_refused_at_load(tmp_path):
    """A 3-line jsonl task has no validation line: refused before any candidate trains."""
    import json

    from ptqlib.errors import ConfigError

    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"p{i}", "completion": f"c{i}"}) + "\n" for i in range(3)))
    text = STUDY.replace("model: tiny", f"model: tiny\ntask: 'jsonl:{data}'")
    with pytest.raises(ConfigError, match="validation split needs at least 5.*selects a setting"):
        _study(tmp_path, text)


def test_selection_seed_trains_the_candidates_on_a_seed_no_test_pipeline_uses(tmp_path):
    """selection_seed: 100: the candidates train (and are scored on validation) at seed 100; the test-set
    pipelines are seeds 0 and 1 only, so the test's seed 0 is not the run that won the selection."""
    from ptqlib.study.graph import build_graph

    study = _study(tmp_path, STUDY.replace("seeds: [0, 1]", "seeds: [0, 1]\nselection_seed: 100"))
    sel = [p for p in study.pipelines if selection.is_selection(p)]
    assert len(sel) == 3 and {p.seed for p in sel} == {100}
    options = [p for o in study.selections[0].options for p in o]
    assert {p.seed for p in options} == {0, 1} and len(options) == 6
    nodes, chains = build_graph(study)
    train_sel = {chains[p.name][0] for p in sel}
    assert all(nodes[s].seed == 100 for s in train_sel)
    resolved = selection.resolve(study, lambda pipeline, metric: 0.7 if "0.0003" in pipeline else 0.5)
    tests = [p for p in resolved.pipelines if p.family == "ft"]
    assert {p.seed for p in tests} == {0, 1} and all(p.stages[0].params["lr"] == 3.0e-4 for p in tests)
    chains2 = build_graph(resolved)[1]
    assert len({chains2[p.name][0] for p in tests}) == 2 and not ({chains2[p.name][0] for p in tests} & train_sel)


def test_a_bad_selection_seed_is_refused(tmp_path):
    from ptqlib.errors import ConfigError

    with pytest.raises(ConfigError, match="selection_seed: -1 is not an integer >= 0"):
        _study(tmp_path, STUDY.replace("seeds: [0, 1]", "seeds: [0, 1]\nselection_seed: -1"))


def test_a_validation_record_without_the_select_metric_is_refused_naming_it(tmp_path, capsys):
    """A finished selection evaluate whose record lacks the metric (an older code's record): without the
    check every value is NaN and the first candidate is 'chosen' with exit 0."""
    from ptqlib.cli import main

    f = tmp_path / "s.yaml"
    f.write_text(textwrap.dedent(STUDY))
    study = load_study(f)
    r = Runner(study, tmp_path / "runs", tmp_path / "reports")
    for name in selection.waiting(r.study):
        ft, ev = r.chains[name]
        _finish(r, ft, {"train_loss_last": 1.0})
        _finish(r, ev, {"rouge_l": 0.5})
    code = main(["run", str(f), "--dry-run", "--runs", str(tmp_path / "runs"), "--reports", str(tmp_path / "reports")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "metrics.json: the validation record of selection pipeline 'ft~select[lr=0.0001]' has no 'field_f1' " \
           "(it records rouge_l)" in err and "Delete that stage directory" in err and "Traceback" not in err


def test_missing_goes_on_from_a_partial_report_on_a_fresh_clone(tmp_path, monkeypatch):
    """``ptqlib run --missing``: a study cut short, its partial report committed, continued on a fresh clone (no
    stage cache) runs only the pipelines the report lacks; the selection and the finished rows are not re-run."""
    from ptqlib.errors import ConfigError

    monkeypatch.setattr(report, "analyse", lambda runner, force=False: None)
    study = _study(tmp_path)
    score = lambda lr, split: {1e-4: 0.3, 3e-4: 0.6, 1e-3: 0.4}[lr] if split == "validation" else 0.5  # noqa: E731
    ex = FakeExecutor(score)
    first = Runner(study, tmp_path / "runs", tmp_path / "reports", reporter=report)
    ex.runner = first
    assert first.run(["base", "ft[seed=0]"], executor=ex) == 0  # the session ends before ft[seed=1]
    assert {x["pipeline"]: x["status"] for x in csv.DictReader(open(first.reports / "results.csv"))} == {
        "base": "ok", "ft[seed=0]": "ok", "ft[seed=1]": "missing"}

    fresh = Runner(study, tmp_path / "clone-runs", tmp_path / "reports", reporter=report)  # the next session
    assert sorted(fresh.leave_reported()) == ["base", "ft[seed=0]", "ft~select[lr=0.0001]", "ft~select[lr=0.0003]",
                                              "ft~select[lr=0.001]"]
    dry = fresh.describe()
    assert "  ft[seed=0]: in the report already (--missing leaves it out)" in dry
    assert "2 distinct stages: 0 cached, 2 to run" in dry  # ft[seed=1]'s finetune and evaluate
    ex2 = FakeExecutor(score)
    ex2.runner = fresh
    assert fresh.run(executor=ex2) == 0
    assert [(n.kind, n.seed) for n in ex2.ran] == [("finetune", 1), ("evaluate", 1)]
    rows = {x["pipeline"]: x for x in csv.DictReader(open(fresh.reports / "results.csv"))}
    assert {p: (x["status"], x["source"]) for p, x in rows.items()} == {
        "base": ("ok", "previous report"), "ft[seed=0]": ("ok", "previous report"), "ft[seed=1]": ("ok", "runs")}
    assert rows["ft[seed=1]"]["finetune.lr"] == "0.0003"  # the choice recorded by the first session

    # a changed study: its new ids are in no report, so everything of ft runs again; without the report, refused
    changed = _study(tmp_path, STUDY.replace("steps: 4", "steps: 5"))
    again = Runner(changed, tmp_path / "clone-runs", tmp_path / "reports", reporter=report)
    assert again.leave_reported() == ["base"]
    with pytest.raises(ConfigError, match=r"--missing .* \(not --fresh-report\)"):
        Runner(study, tmp_path / "clone-runs", tmp_path / "reports", reporter=report, keep_previous=False).leave_reported()


def test_missing_goes_on_from_a_run_cut_short_in_its_selection(tmp_path, monkeypatch):
    """Interrupted before every candidate is recorded: the runner writes selection.csv with the finished candidates'
    values, and the next session's --missing trains only the others, then the test pipelines of the choice."""
    monkeypatch.setattr(report, "analyse", lambda runner, force=False: None)
    study = _study(tmp_path)
    score = lambda lr, split: {1e-4: 0.3, 3e-4: 0.6, 1e-3: 0.4}[lr] if split == "validation" else 0.5  # noqa: E731

    class CutShort(FakeExecutor):
        def submit(self, node, force=False):
            if len(self.ran) == 2:  # the first candidate trained and evaluated: Ctrl-C
                raise KeyboardInterrupt
            return super().submit(node, force)

    first = Runner(study, tmp_path / "runs", tmp_path / "reports", reporter=report)
    ex = CutShort(score)
    ex.runner = first
    with pytest.raises(KeyboardInterrupt):
        first.run(executor=ex)
    assert "results.csv holds what finished" in first.interrupted()
    sel = {x["candidate"]: x["validation"] for x in csv.DictReader(open(first.reports / "selection.csv"))}
    assert sel == {"0.0001": "0.3", "0.0003": "", "0.001": ""}

    fresh = Runner(study, tmp_path / "clone-runs", tmp_path / "reports", reporter=report)
    assert fresh.leave_reported() == ["ft~select[lr=0.0001]"]
    ex2 = FakeExecutor(score)
    ex2.runner = fresh
    assert fresh.run(executor=ex2) == 0
    trained = [(n.seed, n.params["lr"]) for n in ex2.ran if n.kind == "finetune"]
    assert trained == [(0, 3e-4), (0, 1e-3), (1, 3e-4)]  # lr 1e-4 not again; 3e-4 chosen; its seed-0 model shared
    assert [p.stages[0].params["lr"] for p in fresh.study.pipelines if p.family == "ft"] == [3e-4, 3e-4]


def test_a_run_cut_short_in_its_selection_shows_the_choices_it_can_make(tmp_path, monkeypatch):
    """Interrupted after one select's candidates all finished and before another's: selection.csv marks the first
    select's choice (not 'False' everywhere) and results.csv lists its test pipelines as still to run."""
    monkeypatch.setattr(report, "analyse", lambda runner, force=False: None)
    study = _study(tmp_path, STUDY.replace("  ft: [{finetune: full}]",
                                           "  ft: [{finetune: full}]\n  ft5: [{finetune: {method: full, steps: 5}}]"))

    class CutShort(FakeExecutor):
        def submit(self, node, force=False):
            if len(self.ran) == 6:  # ft's three candidates trained and evaluated, none of ft5's
                raise KeyboardInterrupt
            return super().submit(node, force)

    r = Runner(study, tmp_path / "runs", tmp_path / "reports", reporter=report)
    ex = CutShort(lambda lr, split: {1e-4: 0.3, 3e-4: 0.6, 1e-3: 0.4}[lr])
    ex.runner = r
    with pytest.raises(KeyboardInterrupt):
        r.run(executor=ex)
    r.interrupted()
    sel = [(x["family"], x["candidate"], x["chosen"]) for x in csv.DictReader(open(r.reports / "selection.csv"))]
    assert [x for x in sel if x[2] == "True"] == [("ft", "0.0003", "True")]
    rows = {x["pipeline"]: x["status"] for x in csv.DictReader(open(r.reports / "results.csv"))}
    assert rows == {"base": "missing", "ft[seed=0]": "missing", "ft[seed=1]": "missing"}

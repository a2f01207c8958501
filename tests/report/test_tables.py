"""The study's results tables: pipeline runs whose stages are gone from runs/ keep their rows from
the report already written, when (and only when) their stage ids are unchanged."""
import csv
import logging
import shutil

import pandas as pd
import pytest

from ptqlib.engine.runner import Runner
from ptqlib.files import write_json_atomic
from ptqlib.report import analysis, tables
from ptqlib.report.claims import check_claims
from ptqlib.study.schema import load_study

STUDY = """model: tiny
seeds: [0, 1]
pipelines:
  ft16: [{finetune: {method: full, steps: STEPS}}]
  base: []
claims:
  - {claim: fine-tuning helps, a: ft16, b: base, metric: field_f1, relation: ">"}
"""


def _runner(tmp_path, steps: int = 4, keep: bool = True) -> Runner:
    f = tmp_path / "s.yaml"
    f.write_text(STUDY.replace("STEPS", str(steps)))
    return Runner(load_study(f), tmp_path / "runs", tmp_path / "reports", keep_previous=keep)


def _finish(r: Runner, pipeline: str, f1: list[float]) -> None:
    """Write ok records for a pipeline's chain, its evaluate with per-example field F1 ``f1``."""
    for sid in r.chains[pipeline]:
        n = r.nodes[sid]
        rec = {"status": "ok", "kind": n.kind, "label": n.label(), "model": n.model, "timings": {"wall_s": 1.0},
               "metrics": {}}
        if n.kind == "evaluate":
            rec["metrics"] = {"field_f1": sum(f1) / len(f1)}
            rec["outputs"] = {"units": {"task": {"field_f1": f1}}}
        write_json_atomic(r.runs / sid / "metrics.json", rec)


def _csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_a_lost_stage_cache_keeps_the_report_rows(tmp_path, caplog):
    r = _runner(tmp_path)
    f1 = {p.name: [0.9, 0.8, 1.0, 0.7] if p.family == "ft16" else [0.1, 0.2, 0.0, 0.3] for p in r.study.pipelines}
    for name, scores in f1.items():
        _finish(r, name, scores)
    tables.write_results(r)
    first_rows, first_units = _csv(r.reports / "results.csv"), _csv(r.reports / "units.csv")
    assert {row["source"] for row in first_rows} == {"runs"} and len(first_units) == 4 * len(f1)

    shutil.rmtree(r.runs)  # a fresh clone: the committed report, no stage cache
    with caplog.at_level(logging.INFO):
        tables.write_results(_runner(tmp_path))
    assert "kept 3 pipeline runs from the reports" in caplog.text
    again = _csv(r.reports / "results.csv")
    assert [{**row, "source": "runs"} for row in again] == first_rows  # the same values, marked as kept
    assert {row["source"] for row in again} == {"previous report"}
    assert _csv(r.reports / "units.csv") == first_units
    out = analysis.load_outputs(r.reports)
    assert set(out.stages[s]["status"] for s in out.stages) == {"ok (previous report)"}
    verdict = check_claims(out.meta["claims"], out.results, out.units)
    assert verdict.loc[0, "n_examples"] == 4 and verdict.loc[0, "difference"] > 0.6  # the claims still pair the units

    # one pipeline re-run into runs/ replaces its kept row; the others stay kept
    r2 = _runner(tmp_path)
    _finish(r2, "ft16[seed=0]", [0.5, 0.5, 0.5, 0.5])
    tables.write_results(r2)
    rows = {row["pipeline"]: row for row in _csv(r.reports / "results.csv")}
    assert rows["ft16[seed=0]"]["source"] == "runs" and float(rows["ft16[seed=0]"]["field_f1"]) == 0.5
    assert rows["ft16[seed=1]"]["source"] == "previous report"
    units = pd.read_csv(r.reports / "units.csv")
    assert units[units.pipeline == "ft16[seed=0]"].field_f1.tolist() == [0.5] * 4
    assert units[units.pipeline == "ft16[seed=1]"].field_f1.tolist() == f1["ft16[seed=1]"]


def test_changed_stages_or_a_fresh_report_keep_nothing(tmp_path, caplog):
    r = _runner(tmp_path)
    for p in r.study.pipelines:
        _finish(r, p.name, [1.0, 0.0])
    tables.write_results(r)
    shutil.rmtree(r.runs)

    changed = _runner(tmp_path, steps=8)  # ft16's finetune (so its evaluate) has another id now
    with caplog.at_level(logging.WARNING):
        tables.write_results(changed)
    rows = {row["pipeline"]: row for row in _csv(r.reports / "results.csv")}
    assert rows["ft16[seed=0]"]["status"] == "missing" and rows["ft16[seed=0]"]["source"] == "runs"
    assert rows["base"]["source"] == "previous report"  # its chain did not change
    assert "dropped 2 pipeline runs" in caplog.text and "ft16[seed=0]" in caplog.text
    assert {u["pipeline"] for u in _csv(r.reports / "units.csv")} == {"base"}

    tables.write_results(_runner(tmp_path, keep=False))
    assert {row["status"] for row in _csv(r.reports / "results.csv")} == {"missing"}
    assert _csv(r.reports / "units.csv") == []


def test_another_studys_report_fills_a_row_with_the_same_stage_ids(tmp_path, caplog):
    """Studies share runs/: a pipeline whose chain another study already ran (same evaluate stage id)
    takes that study's committed row and units under its own name; a changed chain takes nothing."""
    r = _runner(tmp_path)
    for p in r.study.pipelines:
        _finish(r, p.name, [0.9, 0.8] if p.family == "ft16" else [0.1, 0.2])
    tables.write_results(r)
    shutil.rmtree(r.runs)

    other = tmp_path / "t.yaml"  # another study: the same ft16 chain under another name, a new step count
    other.write_text(STUDY.replace("STEPS", "4").replace("ft16", "full_ft")
                     .replace("base: []", "ft8: [{finetune: {method: full, steps: 8}}]")
                     .replace("b: base", "b: ft8"))
    r2 = Runner(load_study(other), tmp_path / "runs", tmp_path / "reports")
    assert r2.reports != r.reports
    with caplog.at_level(logging.INFO):
        tables.write_results(r2)
    rows = {row["pipeline"]: row for row in _csv(r2.reports / "results.csv")}
    assert rows["full_ft[seed=0]"]["source"] == f"report {r.reports.name}"
    assert rows["full_ft[seed=0]"]["family"] == "full_ft"
    assert abs(float(rows["full_ft[seed=0]"]["field_f1"]) - 0.85) < 1e-12  # the other study's value
    assert rows["ft8[seed=0]"]["status"] == "missing" and rows["ft8[seed=0]"]["source"] == "runs"
    units = pd.read_csv(r2.reports / "units.csv")
    assert set(units.pipeline) == {"full_ft[seed=0]", "full_ft[seed=1]"} and set(units.family) == {"full_ft"}
    assert units[units.pipeline == "full_ft[seed=1]"].field_f1.tolist() == [0.9, 0.8]
    out = analysis.load_outputs(r2.reports)
    assert {s["status"] for s in out.stages.values()} == {f"ok (report {r.reports.name})", "missing"}

    # the study's own report comes first: a re-render keeps its own rows, not the other study's
    tables.write_results(_runner(tmp_path))
    assert {row["source"] for row in _csv(r.reports / "results.csv")} == {"previous report"}


def test_another_studys_damaged_report_is_skipped_with_a_warning(tmp_path, caplog):
    """One other study's results.csv with bytes that are not UTF-8 broke every study's report."""
    r = _runner(tmp_path)
    for p in r.study.pipelines:
        _finish(r, p.name, [0.5, 0.5])
    other = r.reports.parent / "other"
    other.mkdir(parents=True)
    (other / "results.csv").write_bytes(b"pipeline,eval_stage,status\n\xff\xfe broken,\xc3,ok\n")
    with caplog.at_level(logging.WARNING):
        tables.write_results(r)
    assert f"skipping {other}" in caplog.text
    assert {row["status"] for row in _csv(r.reports / "results.csv")} == {"ok"}


def test_the_report_names_the_package_versions_and_warns_when_they_differ():
    same = pd.DataFrame({"pipeline": ["a", "b"], "versions": ["torch 2.13.0+cpu, transformers 5.25.0"] * 2})
    assert analysis.versions_note(same) == "Every stage ran with torch 2.13.0+cpu, transformers 5.25.0."
    mixed = pd.DataFrame({"pipeline": ["a", "b", "c"],
                          "versions": ["transformers 5.25.0", "transformers 5.24.0", "transformers 5.25.0"]})
    note = analysis.versions_note(mixed)
    assert note.startswith("**The stages ran under different package versions**")
    assert "- transformers 5.25.0: a, c" in note and "- transformers 5.24.0: b" in note
    one_mixed_chain = pd.DataFrame({"pipeline": ["a"], "versions": ["transformers 5.24.0 | transformers 5.25.0"]})
    assert analysis.versions_note(one_mixed_chain).startswith("**The stages ran under different")
    assert analysis.versions_note(pd.DataFrame({"pipeline": ["a"]})) == ""  # a report from before the column


def test_a_truncated_units_csv_is_refused_not_rewritten(tmp_path):
    """No runs, and the committed units.csv lost rows: the report is not rewritten from it (the next claim
    failed with a shape error while claims.csv stayed stale); the error names the file and the pipeline."""
    from ptqlib.errors import ConfigError

    r = _runner(tmp_path)
    for p in r.study.pipelines:
        _finish(r, p.name, [0.9, 0.8, 1.0, 0.7])
    tables.write_results(r)
    rows = _csv(r.reports / "results.csv")
    for row in rows:
        row["task_examples"] = 4
    with open(r.reports / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = (r.reports / "units.csv").read_text().splitlines()
    (r.reports / "units.csv").write_text("\n".join(lines[:-2]) + "\n")  # the last run lost two examples
    before = (r.reports / "units.csv").read_text()
    shutil.rmtree(r.runs)
    with pytest.raises(ConfigError, match=r"units\.csv.*has 2 of 4 task examples"):
        tables.write_results(_runner(tmp_path))
    assert (r.reports / "units.csv").read_text() == before


def test_a_shared_stage_id_is_taken_from_the_declared_final_report_and_a_disagreement_is_named(tmp_path, caplog):
    """Two sibling reports hold one evaluate stage id with different numbers (runs on two CPUs): the study
    declared final wins over name order, and the warning names both reports."""
    import json
    import logging

    from ptqlib.report.previous import previous_report

    for name, f1, final in (("aaa", "0.88", False), ("zzz", "0.87", True)):
        d = tmp_path / name
        d.mkdir()
        (d / "results.csv").write_text(f"pipeline,family,status,eval_stage,field_f1,machines\nft,ft,ok,abc123,{f1},cpu\n")
        (d / "study.json").write_text(json.dumps({"name": name, "final": final}))
    (tmp_path / "mine").mkdir()
    with caplog.at_level(logging.WARNING):
        prev = previous_report(tmp_path / "mine")
    assert prev.others["abc123"][0] == "zzz" and prev.others["abc123"][1]["field_f1"] == "0.87"
    assert "reports aaa hold evaluate stage ids of report zzz with other numbers" in caplog.text


def test_the_analysis_is_stale_when_the_verdicts_code_changes():
    """The analysis cache keys on the code that decides verdicts, so a changed rule re-renders a report whose
    results are the same (a new hypothesis text stayed unwritten before)."""
    from pathlib import Path

    from ptqlib import relations
    from ptqlib.report import claims, recovered
    from ptqlib.report.analysis import analysis_code

    code = analysis_code()
    for module in (claims, recovered, relations):
        assert Path(module.__file__).read_bytes() in code


def test_an_interrupted_run_does_not_replace_a_complete_report(tmp_path):
    """A run cut short after the study changed (new ids, some stages not run yet) leaves a complete report as it
    was, so a declared-final report is never half replaced; without a complete report it writes what finished."""
    r = _runner(tmp_path)
    for p in r.study.pipelines:
        _finish(r, p.name, [0.9, 0.8] if p.family == "ft16" else [0.1, 0.2])
    tables.write_results(r)
    before = (r.reports / "results.csv").read_bytes(), (r.reports / "units.csv").read_bytes()
    assert tables.complete_report(r.reports)
    changed = _runner(tmp_path, steps=6)  # ft16's ids change; only base is finished
    assert tables.write_results(changed, interrupted=True) is None
    assert ((r.reports / "results.csv").read_bytes(), (r.reports / "units.csv").read_bytes()) == before
    assert tables.write_results(changed) is not None  # a run that ends reports what it has, failures marked
    assert not tables.complete_report(r.reports)
    assert tables.write_results(changed, interrupted=True) is not None  # nothing complete to keep: written


def test_a_second_runner_writing_the_analysis_notebook_meanwhile_does_not_break_the_report(tmp_path, monkeypatch):
    """Two runners of one study analyse it at once: papermill rewrites its output notebook as cells run, so
    each runner executes into a file of its own and renames it into place; the other's half-written
    ``_analysis/notebook.ipynb`` at that moment is never what this runner renders (it was, and the report's
    copy then failed with FileNotFoundError, a rare failure of tests/integration/test_parallel.py)."""
    import nbformat
    import papermill

    r = _runner(tmp_path)
    for p in r.study.pipelines:
        _finish(r, p.name, [0.5, 0.25])
    tables.write_results(r)

    def other_runner_meanwhile(input_path, output_path, **kw):
        nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("the analysis of this runner")])
        nbformat.write(nb, output_path)
        (r.reports / "_analysis" / "notebook.ipynb").write_text('{"cells": [{"cell_')  # cut mid-write

    monkeypatch.setattr(papermill, "execute_notebook", other_runner_meanwhile)
    index = tables.analyse(r, force=True)
    assert index is not None and "the analysis of this runner" in index.read_text()
    assert [f.name for f in (r.reports / "_analysis").glob("notebook*.ipynb")] == ["notebook.ipynb"]

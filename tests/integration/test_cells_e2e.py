"""A study over two tasks through the CLI on the tiny model: each task a cell, the lr selected per task by its
own score, the claim decided per cell, and the README findings saying in how many cells it holds."""
import csv

import pytest

from tests.integration.test_selection_e2e import cli

pytestmark = pytest.mark.slow

STUDY = """\
study: cells
model: tiny
task: [meetings, stdlib-docstrings]
seeds: [0]
defaults:
  finetune: {steps: 2, batch_size: 2, train_samples: 8, max_length: 192}
  evaluate: {ppl_samples: 2, ppl_seq_len: 64, ppl_sources: [pydoc], task_samples: 6, max_new_tokens: 8, batch_size: 6}
pipelines:
  base: []
  rtn2: [{quantize: {method: rtn, bits: 2, group_size: 32}}]
  ft16: [{finetune: {method: full, lr: {select: [1.0e-4, 1.0e-3], metric: task_score}}}]
claims:
  - {claim: "RTN 2-bit raises prose perplexity", a: base, b: rtn2, metric: ppl, relation: ">"}
  - {claim: "fine-tuning beats the base model", a: ft16, b: base, metric: task_score, relation: ">"}
"""


def test_a_study_over_two_tasks_decides_each_claim_per_task(tmp_path):
    from ptqlib.report.findings import render

    study = tmp_path / "cells.yaml"
    study.write_text(STUDY)
    cli("run", str(study), "--runs", str(tmp_path / "runs"), "--reports", str(tmp_path / "reports"), cwd=tmp_path)
    rep = tmp_path / "reports/cells"
    rows = {r["pipeline"]: r for r in csv.DictReader(open(rep / "results.csv"))}
    assert set(rows) == {f"{f}[task={t}]" for f in ("base", "rtn2", "ft16") for t in ("meetings", "stdlib-docstrings")}
    for name, r in rows.items():  # each task's own score under one name
        assert r["task"] == r["grid.task"] and r["status"] == "ok"
        assert r["task_score"] == r["field_f1" if r["task"] == "meetings" else "rouge_l"]
    units = [u for u in csv.DictReader(open(rep / "units.csv")) if u["group"] == "task"]
    doc_units = [u for u in units if u["pipeline"].endswith("[task=stdlib-docstrings]")]
    assert len(doc_units) == 18 and all(u["doc"] != "" and u["task_score"] == u["rouge_l"] for u in doc_units)
    assert all(u["task_score"] == u["field_f1"] for u in units if u["pipeline"].endswith("[task=meetings]"))
    sel = list(csv.DictReader(open(rep / "selection.csv")))  # one selection per task, by that task's score
    assert sorted((r["pipeline"], r["metric"]) for r in sel) == sorted(
        (f"ft16~select[lr={lr},task={t}]", "task_score") for lr in ("0.0001", "0.001")
        for t in ("meetings", "stdlib-docstrings"))
    claims = list(csv.DictReader(open(rep / "claims.csv")))
    assert [(c["claim"], c["cell"]) for c in claims] == [
        ("RTN 2-bit raises prose perplexity", "task=meetings"),
        ("RTN 2-bit raises prose perplexity", "task=stdlib-docstrings"),
        ("fine-tuning beats the base model", "task=meetings"),
        ("fine-tuning beats the base model", "task=stdlib-docstrings")]
    # each cell's own runs: the meetings cell's perplexity is base's on meetings, not a mean over both tasks
    assert float(claims[0]["mean_a"]) == pytest.approx(float(rows["base[task=meetings]"]["ppl"]))
    assert float(claims[3]["mean_a"]) == pytest.approx(float(rows["ft16[task=stdlib-docstrings]"]["rouge_l"]))
    assert claims[2]["verdict"].startswith("undecided (needs >= 3 seeds")
    text = render(tmp_path / "reports", tmp_path)
    assert "  - RTN 2-bit raises prose perplexity: holds in " in text and " of 2 cells" in text
    html = (rep / "index.html").read_text()  # the report names each row's cell, and compares within one cell
    assert "RTN 2-bit raises prose perplexity [task=stdlib-docstrings]" in html
    assert "(task=meetings) on 6 examples (task_score)" in html

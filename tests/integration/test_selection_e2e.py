"""A study that selects its learning rate on the validation split, through the CLI on the tiny model:
the selection runs, the test-set run trains at the chosen lr, the report shows the selection table."""
import csv
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

# the smoke study's settings, one pipeline: 2 trainings + 2 validation evaluations + 1 test evaluation
STUDY = """\
study: select
model: tiny
task: meetings
seeds: [0]
defaults:
  finetune: {steps: 4, batch_size: 2, train_samples: 16, max_length: 192}
  evaluate: {ppl_samples: 2, ppl_seq_len: 64, ppl_sources: [pydoc], task_samples: 4, max_new_tokens: 16, batch_size: 4}
pipelines:
  ft16: [{finetune: {method: full, lr: {select: [1.0e-4, 1.0e-3], metric: field_f1}}}]
"""


def cli(*args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    p = subprocess.run([sys.executable, "-m", "ptqlib", *args], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=900)
    if p.returncode:
        raise AssertionError(f"exit {p.returncode}\n{p.stdout}\n{p.stderr[-4000:]}")
    return p


def test_select_lr_on_validation_end_to_end(tmp_path):
    study = tmp_path / "select.yaml"
    study.write_text(STUDY)
    args = (str(study), "--runs", str(tmp_path / "runs"), "--reports", str(tmp_path / "reports"))
    p = cli("run", *args, cwd=tmp_path)
    assert "selection on the validation split first: ft16~select[lr=0.0001], ft16~select[lr=0.001]" in p.stderr
    rep = tmp_path / "reports/select"
    sel = list(csv.DictReader(open(rep / "selection.csv")))
    assert [(r["family"], r["key"], r["candidate"], r["metric"]) for r in sel] == [
        ("ft16", "lr", "0.0001", "field_f1"), ("ft16", "lr", "0.001", "field_f1")]
    assert all(0 <= float(r["validation"]) <= 1 for r in sel)
    assert [r["chosen"] for r in sel].count("True") == 1
    chosen = next(r for r in sel if r["chosen"] == "True")
    # the rule: the higher validation F1, the first on a tie
    assert chosen == max(sel, key=lambda r: (float(r["validation"]), -sel.index(r)))
    rows = list(csv.DictReader(open(rep / "results.csv")))
    assert [r["pipeline"] for r in rows] == ["ft16"] and rows[0]["status"] == "ok"  # no validation rows
    assert float(rows[0]["finetune.lr"]) == float(chosen["candidate"])
    recs = [json.loads(f.read_text()) for f in (tmp_path / "runs").glob("*/metrics.json")]
    evals = sorted(r["params"]["split"] for r in recs if r["kind"] == "evaluate")
    assert evals == ["test", "validation", "validation"]
    assert sum(r["kind"] == "finetune" for r in recs) == 2  # the test run reuses the chosen seed-0 training
    assert "Selection on the validation split" in (rep / "index.html").read_text()
    # cached: a second run trains nothing; the dry run shows the choice and the test-set stages
    p = cli("run", *args, cwd=tmp_path)
    assert "0 ran, 5 cached" in p.stderr and "selection on the validation split first" not in p.stderr
    dry = cli("run", *args, "--dry-run", cwd=tmp_path).stdout
    assert f"ft16: lr = {chosen['candidate']} chosen by field_f1 on the validation split" in dry
    assert "  ft16: finetune(full, 4 steps, seed 0)" in dry and "5 distinct stages: 5 cached, 0 to run" in dry

"""Stage ids are content addresses: the committed reports name, per pipeline run, the evaluate stage
id it was computed under. A refactor, a new setting or a moved module must keep every one of them
(or the studies must be re-run and their reports re-committed)."""
import csv
from pathlib import Path

import pytest

from ptqlib.engine.runner import Runner
from ptqlib.report import tables
from ptqlib.study.schema import load_study

ROOT = Path(__file__).resolve().parents[2]
STUDIES = sorted(p.parent.name for p in (ROOT / "reports").glob("*/results.csv")
                 if (ROOT / "parameters" / f"{p.parent.name}.yaml").exists())


@pytest.mark.parametrize("study", STUDIES)
def test_committed_report_rows_keep_their_stage_ids(study, tmp_path):
    # no runs here: a select's choice is read from the committed selection.csv
    runner = Runner(load_study(ROOT / "parameters" / f"{study}.yaml", allow_network=False), tmp_path / "runs",
                    ROOT / "reports", reporter=tables)
    now = {name: chain[-1] for name, chain in runner.chains.items()}
    with open(ROOT / "reports" / study / "results.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("eval_stage")]
    assert rows
    changed = [(r["pipeline"], r["eval_stage"], now.get(r["pipeline"])) for r in rows
               if now.get(r["pipeline"]) != r["eval_stage"]]
    assert not changed, f"{len(changed)} of {len(rows)} rows: (pipeline, committed id, id now) {changed[:5]}"


def test_the_studies_are_found():
    assert {"default", "ptq-qlora", "l4q", "blora", "deploy", "smoke"} <= set(STUDIES)

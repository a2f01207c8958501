"""Stage ids are content addresses: the committed reports name, per pipeline run, the evaluate stage
id it was computed under. A refactor, a new setting or a moved module must keep every one of them
(or the studies must be re-run and their reports re-committed)."""
import csv
from pathlib import Path

import pytest

from ptqlib import precision
from ptqlib.engine.runner import Runner
from ptqlib.report import tables
from ptqlib.study.schema import load_study

ROOT = Path(__file__).resolve().parents[2]
STUDIES = sorted(p.parent.name for p in (ROOT / "reports").glob("*/results.csv")
                 if (ROOT / "parameters" / f"{p.parent.name}.yaml").exists())


def _ran_bf16(study: str) -> bool:
    """Did the committed report's machine compute bf16 natively? ``precision: auto`` resolves per machine when
    the study file loads (``ptqlib.precision``), and the resolved precision enters the ids: a stage that
    recorded bf16 ran where bf16 is native (it is refused elsewhere)."""
    with open(ROOT / "reports" / study / "results.csv", newline="") as f:
        return any(v == "bf16" for r in csv.DictReader(f) for k, v in r.items()
                   if k == "precision" or (k or "").endswith(".precision"))


@pytest.mark.parametrize("study", STUDIES)
def test_committed_report_rows_keep_their_stage_ids(study, tmp_path, monkeypatch):
    # `auto` resolved as on the machine that made the report, so the test holds on a CPU without bf16 too
    native = _ran_bf16(study)
    monkeypatch.setattr(precision, "bf16_native", lambda device=None: (native, "the committed report's machine"))
    # no runs here: a select's choice is read from the committed selection.csv
    runner = Runner(load_study(ROOT / "parameters" / f"{study}.yaml", allow_network=False), tmp_path / "runs",
                    ROOT / "reports", reporter=tables)
    now = {name: chain[-1] for name, chain in runner.chains.items()}
    rows = []  # the test pipelines' rows, and the selection candidates' (a run cut short in its selection has only those)
    for table in ("results.csv", "selection.csv"):
        if (ROOT / "reports" / study / table).exists():
            with open(ROOT / "reports" / study / table, newline="") as f:
                rows += [r for r in csv.DictReader(f) if r.get("eval_stage")]
    assert rows
    changed = [(r["pipeline"], r["eval_stage"], now.get(r["pipeline"])) for r in rows
               if now.get(r["pipeline"]) != r["eval_stage"]]
    assert not changed, f"{len(changed)} of {len(rows)} rows: (pipeline, committed id, id now) {changed[:5]}"


def test_auto_enters_the_ids_as_the_machine_resolves_it(monkeypatch):
    """Why the test above resolves ``auto`` as the report's machine did: on a CPU without bf16 every id differs."""
    ids = []
    for native in (True, False):
        monkeypatch.setattr(precision, "bf16_native", lambda device=None, n=native: (n, "test"))
        ids.append(Runner(load_study(ROOT / "parameters" / "smoke.yaml", allow_network=False)).chains["ft16"])
    assert ids[0] != ids[1] and _ran_bf16("smoke")


def test_the_studies_are_found():
    assert {"default", "ptq-qlora", "l4q", "blora", "deploy", "smoke"} <= set(STUDIES)

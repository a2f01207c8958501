"""Runner pieces that need no notebook execution: progress estimates, stage pages, kernel transport."""
import base64
import csv
import logging
import os

import nbformat
import pytest

from ptqlib.engine.executors import InlineExecutor
from ptqlib.engine.progress import Progress
from ptqlib.engine.runner import Runner
from ptqlib.engine.stage import kernel_manager_kwargs, render_html, stage_environment
from ptqlib.files import write_json_atomic
from ptqlib.study.schema import load_study


def _study(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("model: tiny\nseeds: [0, 1]\npipelines:\n  ft16: [{finetune: {method: full, steps: 4}}]\n")
    return load_study(f)


def test_time_left_comes_from_similar_recorded_stages(tmp_path):
    r = Runner(_study(tmp_path), tmp_path / "runs", tmp_path / "reports")
    ft0, ev0 = r.chains["ft16[seed=0]"]
    ft1, ev1 = r.chains["ft16[seed=1]"]
    for sid, wall in ((ft0, 100.0), (ev0, 20.0)):  # seed 0 finished earlier
        n = r.nodes[sid]
        write_json_atomic(r.runs / sid / "metrics.json", {"status": "ok", "kind": n.kind, "label": n.label(),
                                                          "model": n.model, "timings": {"wall_s": wall}})
    other = r.runs / "otherid"  # the same stage on another model says nothing about this one
    write_json_atomic(other / "metrics.json", {"status": "ok", "kind": "finetune", "label": r.nodes[ft0].label(),
                                               "model": "smollm2-135m", "timings": {"wall_s": 5000.0}})
    (r.runs / ".lock").write_text("")  # the runner's lock file lives there too
    p = Progress(r, [ft1, ev1])
    assert p.estimate(ft1) == 100.0 and p.estimate(ev1) == 20.0  # same stage up to the seed
    assert p.left() == "~2m00s"
    p.start(ft1)
    p.done(ft1, True)
    assert p.finished == 1 and p.left() == "~0m20s"
    empty = Progress(Runner(_study(tmp_path), tmp_path / "none", tmp_path / "reports"), [ft1])
    assert empty.left() == "unknown"


def test_stage_page_shows_injected_parameters_only(tmp_path, caplog):
    nb = nbformat.v4.new_notebook()
    png = base64.b64encode(bytes.fromhex("89504e470d0a1a0a")).decode()
    nb.cells = [nbformat.v4.new_code_cell("lr = 0.5  # notebook_own_value", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell("lr = 0.001", metadata={"tags": ["injected-parameters"]}),
                nbformat.v4.new_code_cell("plot()", outputs=[nbformat.v4.new_output(
                    "display_data", data={"image/png": png, "text/plain": "<Figure>"})])]
    nbformat.write(nb, tmp_path / "notebook.ipynb")
    with caplog.at_level(logging.WARNING):
        render_html(tmp_path, back="../index.html")
    html = (tmp_path / "report.html").read_text()
    assert "0.001" in html and "notebook_own_value" not in html
    assert 'href="../index.html"' in html and "back to the study report" in html
    assert "Alternative text" not in caplog.text


@pytest.mark.skipif(os.name == "nt", reason="Unix sockets")
def test_stage_kernels_use_unix_sockets():
    km = kernel_manager_kwargs()["kernel_manager_class"](kernel_name="python3")
    assert km.transport == "ipc" and "ptqlib-kernel-" in km.ip


def test_stage_environment_is_restored():
    before = dict(os.environ)
    with stage_environment(progress=False):
        assert "IProgress" in os.environ["PYTHONWARNINGS"] and os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    assert dict(os.environ) == before


def test_run_exits_non_zero_when_the_analysis_fails(tmp_path, monkeypatch, capsys):
    """A study whose report could not be written is not a success (the probe saw exit 0)."""
    from ptqlib.cli import main
    from ptqlib.engine.runner import Runner
    from ptqlib.report import tables as report

    f = tmp_path / "s.yaml"
    f.write_text("model: tiny\npipelines:\n  base: []\n")
    monkeypatch.setattr(Runner, "to_run", lambda self, plan, force=False: [])  # nothing to run
    monkeypatch.setattr(report, "analyse", lambda runner, force=False: None)  # the analysis notebook failed
    assert main(["run", str(f), "--runs", str(tmp_path / "runs"), "--reports", str(tmp_path / "reports")]) == 1
    assert "the analysis failed" in capsys.readouterr().err
    monkeypatch.setattr(report, "analyse", lambda runner, force=False: tmp_path / "index.html")
    assert main(["run", str(f), "--runs", str(tmp_path / "runs"), "--reports", str(tmp_path / "reports")]) == 0


def _cached_study(tmp_path, transformers: dict[str, str]) -> list[str]:
    """A finished study whose records name ``transformers[sid]`` (else this environment's) versions."""
    from ptqlib.engine.record import versions

    r = Runner(_study(tmp_path), tmp_path / "runs", tmp_path / "reports")  # writes tmp_path / "s.yaml"
    sids = list(dict.fromkeys(s for c in r.chains.values() for s in c))
    for i, sid in enumerate(sids):
        n = r.nodes[sid]
        v = {**versions(), **({"transformers": transformers[sid]} if sid in transformers else {})}
        write_json_atomic(r.runs / sid / "metrics.json", {
            "status": "ok", "kind": n.kind, "label": n.label(), "model": n.model, "metrics": {"field_f1": 0.5},
            "timings": {"wall_s": 1.0, "started": float(i), "finished": float(i) + 0.5}, "versions": v})
    return sids


def test_cached_stages_under_other_package_versions_are_named(tmp_path, monkeypatch, caplog):
    """A fresh install with a newer transformers reuses old records (ids hash no versions): the run
    says so, naming the package, the recorded version, how many stages and this environment's."""
    from ptqlib.cli import main
    from ptqlib.engine.record import versions, versions_label
    from ptqlib.report import tables as report

    monkeypatch.setattr(report, "analyse", lambda runner, force=False: tmp_path / "index.html")
    args = ["run", str(tmp_path / "s.yaml"), "--runs", str(tmp_path / "runs"), "--reports", str(tmp_path / "reports")]
    sids = _cached_study(tmp_path, {})
    with caplog.at_level(logging.WARNING):
        assert main(args) == 0
    assert "other package versions" not in caplog.text  # all recorded here: nothing to say

    caplog.clear()
    _cached_study(tmp_path, {sids[0]: "0.0.1"})  # seed 0's fine-tuning
    with caplog.at_level(logging.WARNING):
        assert main(args) == 0
    here = versions()["transformers"]
    assert f"transformers 0.0.1 in 1 (here {here})" in caplog.text and "--force" in caplog.text
    rows = {row["pipeline"]: row["versions"] for row in csv.DictReader(open(tmp_path / "reports" / "s" / "results.csv"))}
    assert rows["ft16[seed=0]"].count(" | ") == 1 and "transformers 0.0.1" in rows["ft16[seed=0]"]  # a mixed chain
    assert rows["ft16[seed=1]"] == versions_label(versions())


def test_a_run_that_starts_on_a_busy_cpu_says_its_times_are_no_cost_figures(tmp_path, monkeypatch, caplog):
    """Other work holding the cores when stages are to run: one warning before the first stage (the 1-minute
    load, the cores); nothing to run, nothing said; none before a later phase of the same run (a selection
    phase's stages raised the load themselves)."""
    from ptqlib.engine import record
    from ptqlib.engine import runner as runner_mod

    monkeypatch.setattr(os, "getloadavg", lambda: (2.5, 2.0, 2.0))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(record, "others_busy_cores", lambda sample_s=0.3: 1.5)
    sids = _cached_study(tmp_path, {})
    r = Runner(load_study(tmp_path / "s.yaml"), tmp_path / "runs", tmp_path / "reports")
    with caplog.at_level(logging.WARNING):
        r._run_stages(None, False, InlineExecutor(r.runs), report=False)
    assert "already busy" not in caplog.text
    (r.runs / sids[-1] / "metrics.json").unlink()  # one stage to run: stopped at its start, after the warning

    class Started(Exception):
        pass

    def stop(*args, **kwargs):
        raise Started

    monkeypatch.setattr(runner_mod.Runner, "_start_ready", stop)
    with caplog.at_level(logging.WARNING), pytest.raises(Started):
        r._run_stages(None, False, InlineExecutor(r.runs), report=False)
    assert "the CPU is already busy (1-minute load 2.5 on 2 cores, 1.5 cores busy with other work now)" in caplog.text
    caplog.clear()  # the test-set phase after a selection phase of this run: the load is the run's own
    r.done[sids[0]] = "ok"
    with caplog.at_level(logging.WARNING), pytest.raises(Started):
        r._run_stages(None, False, InlineExecutor(r.runs), report=False)
    assert "already busy" not in caplog.text


def test_sockets_of_dead_runners_are_removed(tmp_path):
    """A runner killed by SIGKILL leaves its kernels' socket files; the next runner removes those whose owner
    is gone and leaves a live process's (and names it cannot attribute) alone."""
    import subprocess
    import sys

    from ptqlib.engine.stage import SOCKET_PREFIX, remove_stale_sockets

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    names = [f"{SOCKET_PREFIX}{dead}-abc123def456-1", f"{SOCKET_PREFIX}{dead}-abc123def456-2",
             f"{SOCKET_PREFIX}{os.getpid()}-0123456789ab-1", f"{SOCKET_PREFIX}14928f03532a-1"]
    for n in names:
        (tmp_path / n).write_text("")
    assert remove_stale_sockets(str(tmp_path)) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[2:])


def test_a_run_goes_seed_by_seed_so_a_cut_short_run_leaves_whole_seeds(tmp_path):
    """Stages are submitted seed by seed across pipelines (the study's order within a seed), not pipeline by
    pipeline: a run stopped after k seeds' stages holds k paired replicates of every claim."""
    from ptqlib.engine.executors import _Done
    from ptqlib.engine.stage import OK

    f = tmp_path / "s.yaml"
    f.write_text("model: tiny\nseeds: [2, 0, 1]\npipelines:\n  ft16: [{finetune: {method: full, steps: 4}}]\n"
                 "  lora: [{finetune: {method: lora, steps: 4}}]\n")
    r = Runner(load_study(f), tmp_path / "runs", tmp_path / "reports")
    submitted = []

    class Recording:
        slots = 1

        def submit(self, node, force=False):
            submitted.append((node.seed, node.kind, node.params.get("method")))
            return _Done(OK)

    r._run_stages(None, False, Recording(), report=False)
    one_seed = [("finetune", "full"), ("evaluate", None), ("finetune", "lora"), ("evaluate", None)]
    assert submitted == [(seed, kind, method) for seed in (2, 0, 1) for kind, method in one_seed]

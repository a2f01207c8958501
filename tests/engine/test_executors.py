"""Executors without running a notebook: choice and validation, GPU slots, threads, the stage lock."""
import subprocess

import pytest

from ptqlib.engine.executors import InlineExecutor, LocalExecutor, make_executor, submitit_parameters
from ptqlib.engine.runner import Runner
from ptqlib.engine.stage import stage_busy, stage_lock
from ptqlib.study.params import ConfigError
from ptqlib.study.schema import load_study


def _runner(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("model: tiny\npipelines:\n  a: []\n  b: [{finetune: full}]\n")
    return Runner(load_study(f), tmp_path / "runs", tmp_path / "reports")


def test_make_executor_choices(tmp_path):
    assert isinstance(make_executor("local", tmp_path), InlineExecutor)  # --jobs 1: this process
    ex = make_executor("local", tmp_path, jobs=3)
    assert isinstance(ex, LocalExecutor) and ex.slots == 3
    ex = make_executor("local", tmp_path, gpus=["0", "1"])  # one job per GPU by default
    assert isinstance(ex, LocalExecutor) and ex.slots == 2
    with pytest.raises(ValueError, match="executor 'pbs' is not valid; valid: local, slurm, submitit-local"):
        make_executor("pbs", tmp_path)
    with pytest.raises(ValueError, match="--jobs must be >= 1, got 0"):
        make_executor("local", tmp_path, jobs=0)
    with pytest.raises(ValueError, match="gpus must be distinct"):
        make_executor("local", tmp_path, jobs=2, gpus=["0", "0"])
    with pytest.raises(ValueError, match="--threads must be >= 1, got 0"):
        make_executor("local", tmp_path, jobs=2, threads=0)
    ex = make_executor("local", tmp_path, jobs=2, threads=3)  # a serial run's count, kept under --jobs 2
    assert ex.stage_env(None)["OMP_NUM_THREADS"] == "3"
    with pytest.raises(ValueError, match="--threads 2 applies to --executor local only"):
        make_executor("submitit-local", tmp_path, threads=2)  # accepted and ignored before


def test_each_running_stage_gets_its_own_gpu_and_a_share_of_the_threads(tmp_path, monkeypatch):
    import threading

    r = _runner(tmp_path)
    started, release, results = [], {}, {}

    def fake_run_stage(runs, node, kernel, progress, force, env):
        started.append((node.id, env))
        release[node.id] = threading.Event()
        release[node.id].wait(10)
        return results.get(node.id, "ok")

    monkeypatch.setattr("ptqlib.engine.executors.run_stage", fake_run_stage)
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    ex = LocalExecutor(tmp_path / "runs", jobs=2, gpus=["3", "5"])
    nodes = list(r.nodes.values())
    h1, h2 = ex.submit(nodes[0]), ex.submit(nodes[1])
    _wait(lambda: len(started) == 2)
    envs = dict(started)
    assert [envs[n.id]["CUDA_VISIBLE_DEVICES"] for n in nodes[:2]] == ["3", "5"]
    assert envs[nodes[0].id]["OMP_NUM_THREADS"] == "4"  # 8 cores / 2 jobs, in the stage's own environment
    assert h1.poll() is None
    release[nodes[0].id].set()
    _wait(lambda: h1.poll() == "ok")
    h3 = ex.submit(nodes[2])  # the freed GPU goes to the next stage
    _wait(lambda: len(started) == 3)
    assert started[2][1]["CUDA_VISIBLE_DEVICES"] == "3"
    results[nodes[1].id] = "busy"
    release[nodes[1].id].set()
    release[nodes[2].id].set()
    _wait(lambda: h2.poll() == "busy" and h3.poll() == "ok")


def _wait(cond, timeout=10.0):
    import time

    t0 = time.time()
    while not cond():
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.01)


def test_submitit_parameters_from_the_executor_section(tmp_path):
    assert submitit_parameters({"partition": "gpu", "time_min": 60, "gpus": 1, "mem_gb": 32}) == {
        "slurm_partition": "gpu", "timeout_min": 60, "gpus_per_node": 1, "mem_gb": 32}
    with pytest.raises(ValueError, match="unknown key.*partion.*valid: partition"):
        submitit_parameters({"partion": "gpu"})
    f = tmp_path / "s.yaml"
    f.write_text("model: tiny\nexecutor: {partition: gpu, gpus: -1}\npipelines:\n  a: []\n")
    with pytest.raises(ConfigError, match="executor.gpus: -1 must be a number >= 0"):
        load_study(f)
    f.write_text("model: tiny\nexecutor: {partiton: gpu}\npipelines:\n  a: []\n")
    with pytest.raises(ConfigError, match="partiton"):
        load_study(f)
    f.write_text("model: tiny\nexecutor: {partition: gpu, time_min: 30}\npipelines:\n  a: []\n")
    assert load_study(f).executor == {"partition": "gpu", "time_min": 30}


def test_stage_lock_is_exclusive_and_dies_with_its_holder(tmp_path):
    assert not stage_busy(tmp_path, "abc")
    with stage_lock(tmp_path, "abc") as got:
        assert got
        # another process sees the stage as busy while this one holds it
        code = ("import sys; from ptqlib.engine.stage import stage_busy; "
                f"sys.exit(0 if stage_busy({str(tmp_path)!r}, 'abc') else 1)")
        assert subprocess.run([__import__("sys").executable, "-c", code]).returncode == 0
    assert not stage_busy(tmp_path, "abc")
    # a holder killed with SIGKILL releases it (the OS drops flock locks with the process)
    holder = subprocess.Popen([__import__("sys").executable, "-c",
                               "import time; from ptqlib.engine.stage import stage_lock\n"
                               f"with stage_lock({str(tmp_path)!r}, 'abc') as g:\n print(g, flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "True"
    assert stage_busy(tmp_path, "abc")
    holder.kill()
    holder.wait()
    assert not stage_busy(tmp_path, "abc")


def test_a_record_older_than_its_input_is_not_fresh(tmp_path):
    """A stage whose input re-ran holds the old input's result: run_stage must redo it."""
    from ptqlib.engine.stage import fresh
    from ptqlib.files import write_json_atomic

    r = _runner(tmp_path)
    ft, ev = r.chains["b"]
    node = r.nodes[ev]
    def rec(wall, started, ended):
        return {"status": "ok", "metrics": {}, "timings": {"wall_s": wall, "started": started, "finished": ended}}

    write_json_atomic(r.runs / ft / "metrics.json", rec(10.0, 10.0, 20.0))
    write_json_atomic(r.runs / ev / "metrics.json", rec(5.0, 25.0, 30.0))
    assert fresh(r.runs, node)
    write_json_atomic(r.runs / ft / "metrics.json", rec(10.0, 40.0, 50.0))
    assert not fresh(r.runs, node)  # the fine-tune re-ran after this evaluation
    assert fresh(r.runs, r.nodes[ft])  # a root-input stage is fresh when finished


def test_a_failure_outside_the_notebook_under_jobs_2_is_named_in_the_summary(tmp_path, monkeypatch, caplog):
    """A disk error while a runner thread writes a stage's record: the summary names it (it said
    ``FAILED ...: ?``) and no traceback reaches the user."""
    import logging

    def fake_run_stage(runs, node, kernel, progress, force, env):
        raise OSError(28, "No space left on device", str(runs / node.id / "metrics.json"))

    monkeypatch.setattr("ptqlib.engine.executors.run_stage", fake_run_stage)
    r = _runner(tmp_path)
    with caplog.at_level(logging.INFO):
        r.done = {}
        n_failed = r._run_stages(None, False, LocalExecutor(tmp_path / "runs", jobs=2), report=False)  # no kernel server
    assert n_failed == 2
    failed_lines = [m for m in caplog.messages if m.startswith("FAILED ")]
    assert len(failed_lines) == 2
    assert all("No space left on device" in m and "metrics.json" in m for m in failed_lines), failed_lines
    assert "Traceback" not in caplog.text

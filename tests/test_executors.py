"""Executors without running a notebook: choice and validation, GPU slots, threads, the stage lock."""
import subprocess

import pytest

from ptqlib.config import ConfigError, load_study
from ptqlib.executors import InlineExecutor, LocalExecutor, make_executor, submitit_parameters
from ptqlib.runner import Runner
from ptqlib.stage import stage_busy, stage_lock


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


def test_each_running_stage_gets_its_own_gpu_and_a_share_of_the_threads(tmp_path, monkeypatch):
    r = _runner(tmp_path)
    launched = []

    class FakePopen:
        def __init__(self, cmd, env, **kw):
            self.pid, self.env, self.rc = 1000 + len(launched), env, None
            launched.append(self)

        def poll(self):
            return self.rc

    monkeypatch.setattr(subprocess, "Popen", FakePopen)
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    ex = LocalExecutor(tmp_path / "runs", jobs=2, gpus=["3", "5"])
    nodes = list(r.nodes.values())
    h1, h2 = ex.submit(nodes[0]), ex.submit(nodes[1])
    assert [p.env["CUDA_VISIBLE_DEVICES"] for p in launched] == ["3", "5"]
    assert launched[0].env["OMP_NUM_THREADS"] == "4"  # 8 cores / 2 jobs
    assert h1.poll() is None
    launched[0].rc = 0
    assert h1.poll() == "ok"
    h3 = ex.submit(nodes[2])  # the freed GPU goes to the next stage
    assert launched[2].env["CUDA_VISIBLE_DEVICES"] == "3"
    launched[1].rc, launched[2].rc = 3, -9
    assert h2.poll() == "busy" and h3.poll() == "failed"  # 3: another runner has it; killed: failed


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
        code = ("import sys; from ptqlib.stage import stage_busy; "
                f"sys.exit(0 if stage_busy({str(tmp_path)!r}, 'abc') else 1)")
        assert subprocess.run([__import__("sys").executable, "-c", code]).returncode == 0
    assert not stage_busy(tmp_path, "abc")
    # a holder killed with SIGKILL releases it (the OS drops flock locks with the process)
    holder = subprocess.Popen([__import__("sys").executable, "-c",
                               "import time; from ptqlib.stage import stage_lock\n"
                               f"with stage_lock({str(tmp_path)!r}, 'abc') as g:\n print(g, flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "True"
    assert stage_busy(tmp_path, "abc")
    holder.kill()
    holder.wait()
    assert not stage_busy(tmp_path, "abc")

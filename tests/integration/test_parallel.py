"""Stages in parallel: --jobs, submitit's local executor, two runners at once, a killed worker."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

# a 5-stage study whose graph has parallel branches: base eval | finetune -> (eval | rtn -> eval)
MINI = textwrap.dedent("""
    study: mini
    model: tiny
    task: meetings
    defaults:
      finetune: {steps: 2, batch_size: 2, train_samples: 4, max_length: 128}
      evaluate: {ppl_samples: 2, ppl_seq_len: 64, task_samples: 2, max_new_tokens: 8, batch_size: 2}
    pipelines:
      base: []
      ft16: [{finetune: full}]
      ft_rtn: [{finetune: full}, {quantize: {method: rtn, bits: 4, group_size: 32}}]
""")
N_STAGES = 5
# metrics that measure time or memory, which depend on the machine's load and not on the stage
COST = ("seconds", "per_s", "peak_mem", "rss")


def env():
    # one torch thread everywhere, so the records of different executors can be compared exactly
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def run(work: Path, *args, check=True):
    # relative --runs / --reports, as users type them: nothing may depend on the process's cwd
    # (papermill's cwd= would os.chdir the whole runner under the other stages' threads)
    p = subprocess.run([sys.executable, "-m", "ptqlib", "run", "mini.yaml", "--runs", "runs",
                        "--reports", "reports", *args], cwd=work, env=env(), capture_output=True,
                       text=True, timeout=900)
    if check and p.returncode:
        raise AssertionError(f"exit {p.returncode}\n{p.stdout}\n{p.stderr[-4000:]}")
    return p


def quality(runs: Path) -> dict[str, dict]:
    out = {}
    for d in runs.iterdir():
        rec = json.loads((d / "metrics.json").read_text()) if (d / "metrics.json").exists() else None
        if rec:
            assert rec["status"] == "ok", (d, rec.get("error"))
            out[d.name] = {k: "nan" if v != v else v for k, v in rec["metrics"].items()  # nan == nan is False
                           if not any(c in k for c in COST)}
    return out


def workdir(tmp_path_factory, name):
    work = tmp_path_factory.mktemp(name)
    (work / "mini.yaml").write_text(MINI)
    return work


@pytest.fixture(scope="module")
def serial(tmp_path_factory):
    work = workdir(tmp_path_factory, "serial")
    run(work)
    return quality(work / "runs")


def test_jobs_2_gives_the_records_of_a_serial_run(serial, tmp_path_factory):
    work = workdir(tmp_path_factory, "jobs2")
    p = run(work, "--jobs", "2")
    assert "(2 at a time)" in p.stderr and f"{N_STAGES} ran" in p.stderr
    assert "2 running" in p.stderr  # the two branches after the fine-tune did overlap
    assert quality(work / "runs") == serial  # same stage ids, same metrics
    assert not list((work / "runs" / ".jobs").glob("*.spec.json"))  # worker specs cleaned up


def test_submitit_local_executor_gives_the_records_of_a_serial_run(serial, tmp_path_factory):
    pytest.importorskip("submitit")
    work = workdir(tmp_path_factory, "submitit")
    p = run(work, "--executor", "submitit-local", "--jobs", "2")
    assert f"{N_STAGES} ran" in p.stderr
    assert quality(work / "runs") == serial
    assert list((work / "runs" / ".jobs" / "submitit").glob("*_result.pkl"))  # submitit's real job path ran


def test_two_runners_run_each_stage_once(serial, tmp_path_factory):
    work = workdir(tmp_path_factory, "two")
    cmd = [sys.executable, "-m", "ptqlib", "run", str(work / "mini.yaml"), "--runs", str(work / "runs"),
           "--reports", str(work / "reports")]
    procs = [subprocess.Popen(cmd, cwd=work, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    # the whole stderr of a failed runner (pytest would cut the pair's repr short of the error's cause)
    assert all(p.returncode == 0 for p in procs), "\n\n".join(
        f"runner {i}: exit {p.returncode}\n{err[-4000:]}" for i, (p, (_, err)) in enumerate(zip(procs, outs)))
    ran = [line.split()[2] for _, err in outs for line in err.splitlines()
           if " ok " in line and " in " in line and "another runner" not in line]
    assert sorted(ran) == sorted(set(ran)) and len(ran) == N_STAGES, ran  # each stage ran once, in one runner
    assert quality(work / "runs") == serial


def test_killed_worker_loses_no_finished_stage(serial, tmp_path_factory):
    work = workdir(tmp_path_factory, "kill")
    runs = work / "runs"
    cmd = [sys.executable, "-m", "ptqlib", "run", str(work / "mini.yaml"), "--runs", str(runs),
           "--reports", str(work / "reports"), "--jobs", "2"]
    proc = subprocess.Popen(cmd, cwd=work, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 600
        while time.time() < deadline:  # a finished stage, and a worker mid-stage
            done = list(runs.glob("*/metrics.json"))
            busy = [p for p in runs.glob("*/notebook.ipynb") if not (p.parent / "metrics.json").exists()]
            if done and busy:
                break
            time.sleep(0.2)
        else:
            pytest.fail("never saw a finished and a running stage at once")
        os.killpg(proc.pid, signal.SIGKILL)  # the runner and its workers (and their kernels)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    finished = {p.parent.name: p.stat().st_mtime_ns for p in runs.glob("*/metrics.json")}
    half = busy[0].parent
    assert not (half / "metrics.json").exists()  # the killed stage does not count as finished
    p = run(work, "--jobs", "2")
    assert f"{len(finished)} cached" in p.stderr and f"{N_STAGES - len(finished)} ran" in p.stderr
    for sid, mtime in finished.items():
        assert (runs / sid / "metrics.json").stat().st_mtime_ns == mtime  # kept, not re-run
    assert quality(runs) == serial

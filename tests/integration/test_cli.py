"""The smoke study through the CLI, as a user runs it: results, pages, caching, failures, kill/resume."""
import csv
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
N_STAGES = 13  # distinct stages of parameters/smoke.yaml


def cli(*args, cwd, check=True, **kw):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    p = subprocess.run([sys.executable, "-m", "ptqlib", *args], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=900, **kw)
    if check and p.returncode:
        raise AssertionError(f"exit {p.returncode}\n{p.stdout}\n{p.stderr[-4000:]}")
    return p


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """Run the smoke study once into a temporary runs/ and reports/."""
    work = tmp_path_factory.mktemp("smoke")
    t0 = time.time()
    p = cli("run", str(ROOT / "parameters/smoke.yaml"), "--runs", str(work / "runs"), "--reports",
            str(work / "reports"), cwd=work)
    return work, p, time.time() - t0


def records(runs: Path) -> dict[str, dict]:
    return {d.name: json.loads((d / "metrics.json").read_text()) for d in runs.iterdir()
            if (d / "metrics.json").exists()}


def test_smoke_study_produces_metrics_and_pages(smoke):
    work, p, secs = smoke
    rows = list(csv.DictReader(open(work / "reports/smoke/results.csv")))
    assert [r["pipeline"] for r in rows] == ["base", "ft16", "ft_rtn[bits=3]", "ft_rtn[bits=4]", "ft_nf4_qlora",
                                             "ft_gptq_qlora"]
    for r in rows:
        assert r["status"] == "ok"
        ppl = float(r["ppl"])
        assert 1 < ppl < 5000  # a random 1024-token model sits near its vocabulary size
        assert 0 <= float(r["field_f1"]) <= 1 and 0 <= float(r["exact_match"]) <= 1
        assert float(r["size_mb_deploy"]) > 0
    size = {r["pipeline"]: float(r["size_mb_deploy"]) for r in rows}
    assert size["ft_rtn[bits=3]"] < size["ft_rtn[bits=4]"] < size["ft16"]
    assert rows[2]["quantize.bits"] == "3" and rows[3]["quantize.bits"] == "4"  # settings travel with numbers
    recs = records(work / "runs")
    assert len(recs) == N_STAGES
    for rec in recs.values():
        assert rec["status"] == "ok" and rec["error"] is None
        assert rec["versions"]["torch"] and rec["device"]["device"] in ("cpu", "cuda")
        assert "git_commit" in rec and rec["timings"]["wall_s"] > 0 and rec["params"]
    ft = next(r for r in recs.values() if r["kind"] == "finetune" and r["params"]["method"] == "full")
    assert len(ft["pipelines"]) == 5  # shared by five pipelines, run once
    gptq = next(r for r in recs.values() if r["kind"] == "quantize" and r["params"]["method"] == "gptq")
    assert gptq["metrics"]["mean_gptq_rel_err"] < gptq["metrics"]["mean_rtn_rel_err"]
    qlora = [r for r in recs.values() if r["kind"] == "finetune" and r["params"]["method"] == "qlora"]
    assert len(qlora) == 2 and all(r["metrics"]["trainable_params"] > 0 for r in qlora)  # on NF4 and on GPTQ
    assert ft["metrics"]["train_loss_last"] < ft["metrics"]["train_loss_first"]
    index = (work / "reports/smoke/index.html").read_text()
    assert "ft_nf4_qlora" in index and "Claims" in index
    # per-example records: every pipeline run's task examples and perplexity windows, pairable by unit
    units = list(csv.DictReader(open(work / "reports/smoke/units.csv")))
    for r in rows:
        mine = [u for u in units if u["pipeline"] == r["pipeline"]]
        task = [u for u in mine if u["group"] == "task"]
        assert [int(u["unit"]) for u in task] == list(range(4))  # smoke: task_samples 4
        assert sum(float(u["field_f1"]) for u in task) / 4 == pytest.approx(float(r["field_f1"]))
        for group in ("ppl", "ppl_stdlib"):
            win = [u for u in mine if u["group"] == group]
            assert len(win) == 4 and math.exp(sum(float(u["nll"]) for u in win)
                                              / sum(float(u["tokens"]) for u in win)) == pytest.approx(float(r[group]))
    claims = list(csv.DictReader(open(work / "reports/smoke/claims.csv")))
    assert claims and {"difference", "ci_low", "ci_high", "seed_sd", "n_examples", "verdict"} <= set(claims[0])
    assert claims[0]["n_examples"] == "4" and float(claims[0]["ci_low"]) <= float(claims[0]["ci_high"])
    for sid in recs:
        assert (work / "reports/smoke/stages" / f"{sid}.html").exists()
        assert f"stages/{sid}.html" in index


def test_rerun_does_no_work(smoke):
    work, _, _ = smoke
    before = {d.name: (d / "metrics.json").stat().st_mtime_ns for d in (work / "runs").iterdir() if d.is_dir()}
    t0 = time.time()
    p = cli("run", str(ROOT / "parameters/smoke.yaml"), "--runs", str(work / "runs"), "--reports",
            str(work / "reports"), cwd=work)
    assert time.time() - t0 < 30
    assert f"0 ran, {N_STAGES} cached" in p.stderr and "analysis up to date" in p.stderr
    after = {d.name: (d / "metrics.json").stat().st_mtime_ns for d in (work / "runs").iterdir() if d.is_dir()}
    assert before == after


def test_dry_run_lists_cached_stages(smoke):
    work, _, _ = smoke
    p = cli("run", str(ROOT / "parameters/smoke.yaml"), "--runs", str(work / "runs"), "--dry-run", cwd=work)
    assert f"{N_STAGES} distinct stages: {N_STAGES} cached, 0 to run" in p.stdout
    assert "ft_rtn[bits=3]: finetune(full" in p.stdout


def test_deleting_a_stage_reruns_it_and_its_dependants_only(smoke):
    import shutil

    work, _, _ = smoke
    recs = records(work / "runs")
    rtn3 = next(s for s, r in recs.items() if r["kind"] == "quantize" and r["params"]["bits"] == 3
                and r["params"]["method"] == "rtn")
    dependant = next(s for s, r in recs.items() if r["input"] == rtn3)
    before = {s: (work / "runs" / s / "metrics.json").stat().st_mtime_ns for s in recs}
    shutil.rmtree(work / "runs" / rtn3)
    p = cli("run", str(ROOT / "parameters/smoke.yaml"), "--runs", str(work / "runs"), "--reports",
            str(work / "reports"), cwd=work)
    assert f"2 ran, {N_STAGES - 2} cached" in p.stderr
    after = {s: (work / "runs" / s / "metrics.json").stat().st_mtime_ns for s in recs}
    changed = {s for s in recs if before[s] != after[s]}
    assert changed == {rtn3, dependant}


def test_failed_stage_is_recorded_and_others_go_on(smoke, tmp_path):
    work, _, _ = smoke
    study = tmp_path / "bad.yaml"
    study.write_text(textwrap.dedent("""
        study: bad
        model: tiny
        task: meetings
        defaults:
          evaluate: {ppl_samples: 4, ppl_seq_len: 64, task_samples: 4, max_new_tokens: 16, batch_size: 4}
        pipelines:
          base: []
          broken:
            - quantize: nf4
            - finetune: {method: qlora, steps: 2, target_modules: [no_such_layer]}
    """))
    p = cli("run", str(study), "--runs", str(work / "runs"), "--reports", str(work / "reports"), cwd=work,
            check=False)
    assert p.returncode == 1
    assert "FAILED" in p.stderr and "no_such_layer" in p.stderr and "1 failed, 1 skipped" in p.stderr
    rows = {r["pipeline"]: r for r in csv.DictReader(open(work / "reports/bad/results.csv"))}
    assert rows["base"]["status"] == "ok" and rows["broken"]["status"] == "failed"  # base: cached from smoke
    failed = [r for r in records(work / "runs").values() if r["status"] == "failed"]
    assert len(failed) == 1 and "no_such_layer" in failed[0]["error"]["message"]


def test_kill_and_resume(smoke, tmp_path):
    """SIGKILL mid-stage loses no finished stage and never takes the half-written one as finished."""
    work, _, _ = smoke
    runs = tmp_path / "runs"
    study = tmp_path / "k.yaml"
    study.write_text(textwrap.dedent("""
        study: kill
        model: tiny
        task: meetings
        defaults:
          evaluate: {ppl_samples: 2, ppl_seq_len: 64, task_samples: 2, max_new_tokens: 8, batch_size: 2}
        pipelines:
          p:
            - finetune: {method: lora, steps: 2, batch_size: 2, train_samples: 4, max_length: 128, merge: true}
            - quantize: {method: rtn, bits: 4, group_size: 32}
    """))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ptqlib", "run", str(study), "--runs", str(runs), "--reports",
                             str(tmp_path / "reports")], cwd=tmp_path, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # wait until the first stage has its record and the second one has started
        deadline = time.time() + 300
        while time.time() < deadline:
            done = [d for d in runs.glob("*/metrics.json")]
            started = [d for d in runs.glob("*/notebook.ipynb") if not (d.parent / "metrics.json").exists()]
            if done and started:
                break
            time.sleep(0.2)
        else:
            pytest.fail("the runner never reached the second stage")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    finished = {d.parent.name: d.stat().st_mtime_ns for d in runs.glob("*/metrics.json")}
    half = started[0].parent
    assert len(finished) == 1 and not (half / "metrics.json").exists()
    p = cli("run", str(study), "--runs", str(runs), "--reports", str(tmp_path / "reports"), cwd=tmp_path)
    assert "1 cached" in p.stderr and "2 ran" in p.stderr
    for sid, mtime in finished.items():
        assert (runs / sid / "metrics.json").stat().st_mtime_ns == mtime  # the finished stage was kept
    assert json.loads((half / "metrics.json").read_text())["status"] == "ok"

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


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


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
    from ptqlib.study.graph import build_graph
    from ptqlib.study.schema import load_study

    # the smoke study's own stages (other tests of this module add stages of their studies to the same runs/)
    ids = set(build_graph(load_study(ROOT / "parameters/smoke.yaml"))[0])
    recs = {sid: rec for sid, rec in records(work / "runs").items() if sid in ids}
    assert len(ids) == len(recs) == N_STAGES
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
    # the terminal: one progress line per stage, no kernel / nbconvert noise
    assert "[1/13] " in p.stderr and "elapsed " in p.stderr and " left " in p.stderr
    for noise in ("without encryption", "Alternative text is missing", "IProgress"):
        assert noise not in p.stderr, noise
    # stage pages: a link back, the injected parameters only, no progress-bar noise
    page = (work / "reports/smoke/stages" / f"{ft['stage_id']}.html").read_text()
    assert "back to the study report" in page and 'href="../index.html"' in page
    assert "_interactive" not in page  # the notebook's own defaults (output_dir = "../runs/_interactive/...") are gone
    assert "IProgress" not in page and "Loading weights" not in page
    assert oct((work / "runs" / ft["stage_id"] / "metrics.json").stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    # the index: settings per pipeline and per-stage cost (the second fine-tuning is its own column)
    assert "quantize(nf4: blocksize 64, double_quant True)" in index and "finetune2 (s)" in index
    claims = list(csv.DictReader(open(work / "reports/smoke/claims.csv")))
    assert claims and {"difference", "ci_low", "ci_high", "seed_sd", "n_examples", "verdict"} <= set(claims[0])
    assert claims[0]["n_examples"] == "4" and float(claims[0]["ci_low"]) <= float(claims[0]["ci_high"])
    for sid in recs:
        assert (work / "reports/smoke/stages" / f"{sid}.html").exists()
        assert f"stages/{sid}.html" in index


def test_rerun_does_no_work(smoke):
    work, _, _ = smoke
    before = {d.name: (d / "metrics.json").stat().st_mtime_ns for d in (work / "runs").iterdir() if (d / "metrics.json").exists()}
    t0 = time.time()
    p = cli("run", str(ROOT / "parameters/smoke.yaml"), "--runs", str(work / "runs"), "--reports",
            str(work / "reports"), cwd=work)
    assert time.time() - t0 < 30
    assert f"0 ran, {N_STAGES} cached" in p.stderr and "analysis up to date" in p.stderr
    after = {d.name: (d / "metrics.json").stat().st_mtime_ns for d in (work / "runs").iterdir() if (d / "metrics.json").exists()}
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
    # a re-run on CPU reproduces the quality numbers bit for bit (same code, versions, threads)
    new = records(work / "runs")
    for k in ("ppl", "ppl_stdlib", "exact_match", "field_f1", "rouge_l"):
        assert new[dependant]["metrics"][k] == recs[dependant]["metrics"][k], k
    assert new[dependant]["outputs"]["units"] == recs[dependant]["outputs"]["units"]


def test_a_fresh_clone_re_decides_the_committed_claims(smoke, tmp_path):
    """The committed report, no stage cache: analyse keeps every row and decides the same claims;
    --fresh-report drops them."""
    import shutil

    work, _, _ = smoke
    shutil.copytree(work / "reports/smoke", tmp_path / "reports/smoke")
    p = cli("analyse", str(ROOT / "parameters/smoke.yaml"), "--runs", str(tmp_path / "no_runs"), "--reports",
            str(tmp_path / "reports"), cwd=tmp_path)
    assert "kept 6 pipeline runs from the reports" in p.stderr
    rows = list(csv.DictReader(open(tmp_path / "reports/smoke/results.csv")))
    assert {r["source"] for r in rows} == {"previous report"} and {r["status"] for r in rows} == {"ok"}
    assert open(tmp_path / "reports/smoke/claims.csv").read() == open(work / "reports/smoke/claims.csv").read()
    assert open(tmp_path / "reports/smoke/units.csv").read() == open(work / "reports/smoke/units.csv").read()
    cli("analyse", str(ROOT / "parameters/smoke.yaml"), "--runs", str(tmp_path / "no_runs"), "--reports",
        str(tmp_path / "reports"), "--fresh-report", cwd=tmp_path, check=False)
    rows = list(csv.DictReader(open(tmp_path / "reports/smoke/results.csv")))
    assert {r["status"] for r in rows} == {"missing"}


def test_failed_stage_is_recorded_and_others_go_on(smoke, tmp_path, monkeypatch):
    work, _, _ = smoke
    # a method that is valid at load and fails at run time (every bad setting is refused at load now), registered
    # from outside ptqlib as a user's would be: the runner and the stage kernels import it
    (tmp_path / "explode_method.py").write_text(textwrap.dedent("""
        from ptqlib.methods import QuantizeMethod, register

        def quantize(input_ref, p, calib=None, progress=False):
            raise RuntimeError("explode: this quantizer fails at run time")

        register(QuantizeMethod("explode", "fails at run time (a test's method)", (4,), "uniform", quantize,
                                lambda *a: {}))
    """))
    monkeypatch.setenv("PTQLIB_METHODS", "explode_method")
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
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
            - quantize: explode
    """))
    p = cli("run", str(study), "--runs", str(work / "runs"), "--reports", str(work / "reports"), cwd=work,
            check=False)
    assert p.returncode == 1, p.stderr[-3000:]
    assert "FAILED" in p.stderr and "this quantizer fails at run time" in p.stderr and "1 failed, 1 skipped" in p.stderr
    rows = {r["pipeline"]: r for r in csv.DictReader(open(work / "reports/bad/results.csv"))}
    assert rows["base"]["status"] == "ok" and rows["broken"]["status"] == "failed"  # base: cached from smoke
    failed = [r for r in records(work / "runs").values() if r["status"] == "failed"]
    assert len(failed) == 1 and "this quantizer fails at run time" in failed[0]["error"]["message"]


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


def test_report_renders_in_a_real_browser(smoke):
    """Headless Chromium opens the smoke report: every image loads, every link resolves, the claims
    table is there; a stage page links back. The screenshot is kept (reports/smoke/screenshot.png)."""
    import shutil
    from urllib.parse import unquote, urlparse

    chromium, driver_bin = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
        from selenium.webdriver.common.by import By
    except ImportError:
        webdriver = None
    if not (chromium and driver_bin and webdriver):
        if os.environ.get("PTQLIB_REQUIRE_BROWSER"):
            pytest.fail("PTQLIB_REQUIRE_BROWSER is set but chromium, chromedriver or selenium is missing")
        pytest.skip("needs Debian's chromium and chromium-driver and the selenium package (.ci/run installs them)")
    work = smoke[0]
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={work / 'chromium-profile'}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_bin), options=opts)
    try:
        def check_page(path: Path) -> list[str]:
            driver.get(path.as_uri())
            driver.execute_script("return document.readyState")
            images = driver.execute_script(
                "return Array.from(document.images).map(i => [i.src.slice(0, 60), i.complete && i.naturalWidth > 0])")
            assert all(ok for _, ok in images), [src for src, ok in images if not ok]
            hrefs = driver.execute_script("return Array.from(document.querySelectorAll('a[href]')).map(a => a.href)")
            for href in hrefs:
                u = urlparse(href)
                if u.scheme == "file":
                    target = Path(unquote(u.path))
                    assert target.exists(), href
                    if u.fragment and target == path:
                        assert driver.execute_script(  # nbconvert keeps heading ids percent-encoded
                            "return !!(document.getElementById(arguments[0]) || document.getElementById(arguments[1]))",
                            u.fragment, unquote(u.fragment)), href
            return hrefs

        index = work / "reports/smoke/index.html"
        hrefs = check_page(index)
        assert driver.execute_script("return document.images.length") >= 3  # quality, deployment, cost plots
        tables = driver.find_elements(By.XPATH, "//table[.//th[contains(., 'verdict')]]")
        assert tables and "fine-tuning beats the base model" in tables[0].text
        height = driver.execute_script("return document.body.scrollHeight")
        driver.set_window_size(1400, min(height, 12000))
        assert driver.save_screenshot(str(work / "reports/smoke/screenshot.png"))
        stage_pages = [h for h in hrefs if "/stages/" in h]
        assert len(stage_pages) == N_STAGES
        back = check_page(Path(unquote(urlparse(stage_pages[0]).path)))
        assert any(urlparse(h).path == index.as_uri()[len("file://"):] for h in back)
    finally:
        driver.quit()

"""The command line's answers to interruption and bad arguments: a message and an exit code, never a traceback."""
import os
import signal

import pytest

from ptqlib.cli import main
from ptqlib.engine.runner import Runner


def _study(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("model: tiny\npipelines:\n  base: []\n")
    return [str(f), "--runs", str(tmp_path / "runs"), "--reports", str(tmp_path / "reports")]


@pytest.mark.parametrize("how, code", [("ctrl-c", 130), ("sigterm", 143)])
def test_an_interrupted_run_says_what_was_cut_short(tmp_path, monkeypatch, capsys, how, code):
    def run(self, *a, **k):
        if how == "ctrl-c":
            raise KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGTERM)  # the handler raises at once, inside run

    monkeypatch.setattr(Runner, "run", run)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["run", *_study(tmp_path)]) == code
    err = capsys.readouterr().err
    assert "interrupted: stages cut short" in err and "Traceback" not in err
    assert (tmp_path / "reports" / "s" / "results.csv").exists()  # what finished is written down
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is the run's only


def test_sigterm_during_a_stage_stops_the_study_instead_of_failing_that_stage(tmp_path, monkeypatch, capsys):
    """With one job the stage runs in the runner's thread: SIGTERM arriving inside it must end the run
    (exit 143), not be recorded as that stage's failure while the runner starts the next stage."""
    import papermill

    started = []

    def execute(*a, **k):
        started.append(k["parameters"]["output_dir"])
        os.kill(os.getpid(), signal.SIGTERM)  # the scheduler's kill arrives while the notebook runs

    monkeypatch.setattr(papermill, "execute_notebook", execute)
    f = tmp_path / "s.yaml"  # two independent stages: the second must not start
    f.write_text("model: tiny\npipelines:\n  a: [{quantize: {method: rtn, bits: 4}}]\n"
                 "  b: [{quantize: {method: rtn, bits: 8}}]\n")
    code = main(["run", str(f), "--runs", str(tmp_path / "runs"), "--reports", str(tmp_path / "reports")])
    err = capsys.readouterr().err
    assert code == 143, err
    assert len(started) == 1
    assert "interrupted: stages cut short" in err and "FAILED" not in err


def test_export_of_something_that_is_not_a_model_is_an_error_message(tmp_path, capsys):
    assert main(["export", str(tmp_path / "missing"), "-o", str(tmp_path / "m.gguf")]) == 2
    assert "cannot load a model from it" in capsys.readouterr().err
    (tmp_path / "evaluate_stage").mkdir()  # an evaluate stage's run directory holds no model
    assert main(["export", str(tmp_path / "evaluate_stage"), "-o", str(tmp_path / "m.gguf")]) == 2
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_a_read_only_runs_dir_is_refused_before_any_stage(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        args = _study(tmp_path)
        args[args.index("--runs") + 1] = str(ro)
        assert main(["run", *args]) == 2
        assert "not writable" in capsys.readouterr().err
    finally:
        ro.chmod(0o755)


def test_a_runs_path_that_is_a_file_is_refused_before_any_stage(tmp_path, capsys, monkeypatch):
    (tmp_path / "afile").write_text("")
    args = _study(tmp_path)
    args[args.index("--runs") + 1] = str(tmp_path / "afile")
    monkeypatch.setattr(Runner, "run", lambda *a, **k: pytest.fail("a stage ran"))
    assert main(["run", *args]) == 2
    assert "afile: not writable" in capsys.readouterr().err


@pytest.mark.parametrize("cmd", ["run", "analyse"])
def test_a_full_reports_disk_is_an_error_naming_the_file_that_loses_nothing(tmp_path, monkeypatch, capsys, cmd):
    """ENOSPC while results.csv is written: exit 1, the file and the way out named, no traceback; the table
    written before is left whole and no temp file stays beside it."""
    import ptqlib.files as files
    from ptqlib.report import tables
    from ptqlib.study.schema import load_study

    args = _study(tmp_path)
    monkeypatch.setattr(Runner, "run", lambda self, *a, **k: tables.write_results(self) and 0)  # the run's report
    monkeypatch.setattr(tables, "analyse", lambda runner, force=False: runner.reports / "index.html")
    tables.write_results(Runner(load_study(args[0]), tmp_path / "runs", tmp_path / "reports"))  # while there is space
    table = tmp_path / "reports" / "s" / "results.csv"
    before = table.read_bytes()
    real = files.os.fdopen

    class Full:  # the file a full disk gives: opens, then every write fails
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "fdopen", lambda fd, mode: Full(real(fd, mode)))
    code = main([cmd, *args])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "No space left on device" in err and "results.csv" in err and "run the command again" in err
    assert "Traceback" not in err
    assert table.read_bytes() == before
    assert not list(table.parent.glob("*.tmp"))


@pytest.mark.parametrize("body, why", [
    ("pipelines:\n  a: [{finetune: full}]\n  b: []\nclaims:\n  - {claim: x, a: a, b: a, metric: field_f1}\n",
     "a and b are both 'a'"),
    ("pipelines:\n  a: []\n  a: [{finetune: full}]\n", "'a'"),
    ("pipelines:\n  a: [{finetune: {method: full, lr: {select: [1.0e-4, 2.0e-4], metric: kl}}}]\n", "not recorded"),
])
def test_a_bad_tiny_study_is_refused_without_importing_torch(tmp_path, body, why):
    """Refusals come in a fraction of a second: validating a study imports neither torch nor transformers
    (their import alone takes about 5 s on these machines) once the tiny model is built."""
    import subprocess
    import sys

    from ptqlib.models import resolve_model

    resolve_model("tiny")
    f = tmp_path / "s.yaml"
    f.write_text("model: tiny\n" + body)
    code = ("import sys; from ptqlib.cli import main; rc = main(['run', sys.argv[1], '--dry-run']); "
            "print('heavy' if {'torch', 'transformers'} & set(sys.modules) else 'light', rc)")
    p = subprocess.run([sys.executable, "-c", code, str(f)], capture_output=True, text=True, timeout=120)
    assert p.stdout.split() == ["light", "2"], p.stdout + p.stderr
    assert why in p.stderr and "Traceback" not in p.stderr


def test_the_help_names_every_command(capsys):
    """The usage line and the description list each subcommand the parser accepts (notebooks was left out)."""
    from ptqlib.cli import _parser

    ap = _parser()
    cmds = next(a for a in ap._actions if a.dest == "cmd").choices
    usage = ap.format_help()
    assert all(c in usage.split("\n\n")[0] for c in cmds), usage  # the usage line
    assert all(c in ap.description for c in cmds if c != "run")


def test_a_report_made_where_auto_was_bf16_is_not_rewritten_on_a_cpu_without_it(tmp_path, monkeypatch, capsys):
    """``precision: auto`` enters the stage ids as the machine resolves it: on a CPU without bf16 every id of a
    report made on one with it differs, and analyse (or run --missing) would drop its rows. It refuses, names the
    way to render it here, and rewrites nothing; with that setting the rows are kept."""
    import shutil

    from ptqlib import precision
    from ptqlib.files import write_json_atomic
    from ptqlib.report import tables
    from ptqlib.study.schema import load_study

    monkeypatch.setattr(precision, "_cuda_device", lambda: False)
    monkeypatch.setattr(tables, "analyse", lambda runner, force=False: runner.reports / "index.html")
    monkeypatch.delenv(precision.AUTO_ENV, raising=False)
    f = tmp_path / "s.yaml"
    f.write_text("model: tiny\nseeds: [0]\npipelines:\n  ft: [{finetune: {method: full, steps: 2}}]\n")
    args = [str(f), "--runs", str(tmp_path / "runs"), "--reports", str(tmp_path / "reports")]
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx512_bf16"}))  # the machine that ran it
    r = Runner(load_study(f), tmp_path / "runs", tmp_path / "reports", reporter=tables)
    for sid in r.chains["ft"]:
        n = r.nodes[sid]
        write_json_atomic(r.runs / sid / "metrics.json", {
            "status": "ok", "kind": n.kind, "label": n.label(), "model": n.model, "timings": {"wall_s": 1.0},
            "metrics": {"field_f1": 0.5} if n.kind == "evaluate" else {}, "outputs": {"units": {}}})
    tables.write_results(r)
    shutil.rmtree(tmp_path / "runs")  # a fresh clone
    results = tmp_path / "reports" / "s" / "results.csv"
    before = results.read_bytes()

    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2"}))  # this machine: no bf16
    for cmd in (["analyse", *args], ["run", *args, "--missing", "--dry-run"]):
        assert main(cmd) == 2
        err = capsys.readouterr().err
        assert "1 of its rows were computed with precision auto = bf16" in err and "resolves auto to fp32" in err
        assert f"PTQLIB_AUTO_PRECISION=bf16 python -m ptqlib analyse {f}" in err and "Traceback" not in err
        assert results.read_bytes() == before
    assert main(["run", *args, "--dry-run"]) == 0  # a plain run may re-run it here, and is told what that replaces
    err = capsys.readouterr().err
    assert "warning: " in err and "this run computes those pipelines again at fp32" in err
    monkeypatch.setenv(precision.AUTO_ENV, "bf16")
    assert main(["analyse", *args]) == 0
    row = next(iter(__import__("csv").DictReader(open(results))))
    assert (row["status"], row["source"], row["field_f1"]) == ("ok", "previous report", "0.5")

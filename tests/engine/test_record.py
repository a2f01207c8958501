"""The record writer: atomic, complete, readable by the group like the other outputs."""
import json
import os
import stat

import pytest

from ptqlib.files import read_json, write_json_atomic


def test_record_is_atomic_and_0644(tmp_path):
    old = os.umask(0o022)
    try:
        p = tmp_path / "runs" / "abc" / "metrics.json"
        write_json_atomic(p, {"status": "ok", "x": 1.5})
        assert stat.S_IMODE(p.stat().st_mode) == 0o644
        assert read_json(p) == {"status": "ok", "x": 1.5}
        assert [f.name for f in p.parent.iterdir()] == ["metrics.json"]  # no temp file left
        write_json_atomic(p, {"status": "failed"})  # replaced whole
        assert json.loads(p.read_text()) == {"status": "failed"}
    finally:
        os.umask(old)


def test_damaged_or_partial_records_count_as_not_finished(tmp_path):
    """Non-UTF-8 bytes, a truncated file, a non-object and a valid but partial record: each is
    'not finished' (the stage runs again), never an exception that blocks the whole runs dir."""
    from ptqlib.engine.record import complete
    from ptqlib.engine.stage import finished
    from ptqlib.files import read_json

    d = tmp_path / "abc"
    d.mkdir()
    rec = d / "metrics.json"
    for raw in (b'{"status": "ok", "metrics": {"ppl": 1.0\xff}', b'{"status": "ok", "met', b'[1, 2]'):
        rec.write_bytes(raw)
        assert read_json(rec) is None and not finished(tmp_path, "abc")
    rec.write_text('{"status": "ok"}')
    assert read_json(rec) == {"status": "ok"} and not complete(read_json(rec)) and not finished(tmp_path, "abc")
    rec.write_text('{"status": "ok", "metrics": {}, "timings": {"wall_s": 1.0}}')
    assert finished(tmp_path, "abc")


def test_atomic_writes_leave_the_old_file_on_failure(tmp_path, monkeypatch):
    """A failed write (a full disk) keeps the previous file whole and leaves no temp behind; two
    writers use distinct temp names."""
    import os

    from ptqlib import files as record

    path = tmp_path / "claims.csv"
    record.write_atomic(path, "old\n")
    real_replace = os.replace

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(record.os, "replace", full_disk)
    with pytest.raises(OSError, match="No space left"):
        record.write_atomic(path, "new, but cut short\n")
    monkeypatch.setattr(record.os, "replace", real_replace)
    assert path.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["claims.csv"]
    record.copy_atomic(path, tmp_path / "copy.csv")
    assert (tmp_path / "copy.csv").read_text() == "old\n"


def test_a_run_dir_has_one_file_mode(tmp_path):
    from ptqlib.files import _umask, normalise_modes

    (tmp_path / "model").mkdir()
    w = tmp_path / "model" / "model.safetensors"
    w.write_bytes(b"x")
    w.chmod(0o600)  # as safetensors writes it
    (tmp_path / "metrics.json").write_text("{}")
    normalise_modes(tmp_path)
    modes = {stat.S_IMODE(f.stat().st_mode) for f in tmp_path.rglob("*") if f.is_file()}
    assert modes == {0o666 & ~_umask()}


def test_records_name_the_machine(monkeypatch):
    """The CPU model (not platform.processor()'s bare 'x86_64'), torch's threads and the device."""
    import torch

    from ptqlib.engine import record

    info = record.device_info()
    assert info["cpu"] and info["cpu"] not in ("x86_64", "aarch64") or not os.path.exists("/proc/cpuinfo")
    assert info["torch_threads"] == torch.get_num_threads() and info["device"] in ("cpu", "cuda")
    assert record.machine_label({"cpu": "AMD EPYC 9R14", "device": "cpu", "torch_threads": 2}) == "AMD EPYC 9R14 (cpu, 2 threads)"
    gpu = {"cpu": "Intel Xeon", "device": "cuda", "gpu": "NVIDIA H200"}
    assert record.machine_label(gpu) == "NVIDIA H200 (cuda; CPU Intel Xeon)"
    assert record.machine_label(None) == "unknown"


def test_a_busy_cpu_is_recorded_and_warned_of(monkeypatch):
    """Each record keeps the 1-minute load as its stage ended; a run that starts on cores half held by other work
    is told that its times are no cost figures (two torch processes on 2 cores slowed stages 3-7x here)."""
    from ptqlib.engine import record

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (3.6, 2.0, 1.0))
    monkeypatch.setattr(record, "others_busy_cores", lambda sample_s=0.3: 1.9)
    assert record.device_info()["load_1min"] == 3.6
    warning = record.busy_cpu()
    assert "1-minute load 3.6 on 2 cores, 1.9 cores busy with other work now" in warning
    assert "no cost figures" in warning and "docs/parallel.md" in warning
    monkeypatch.setattr(record, "others_busy_cores", lambda sample_s=0.3: None)  # no /proc: the load alone
    assert "1-minute load 3.6 on 2 cores)" in record.busy_cpu()
    # the load of work that ended in the last minute (a study stopped and started again): nothing busy now
    monkeypatch.setattr(record, "others_busy_cores", lambda sample_s=0.3: 0.1)
    assert record.busy_cpu() is None
    monkeypatch.setattr(os, "getloadavg", lambda: (0.4, 0.5, 0.5))
    assert record.busy_cpu() is None


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="needs Linux's /proc")
def test_the_cores_busy_now_leave_out_this_process_and_its_children():
    """A child burning a core is this run's own work (a zygote importing torch): its CPU time counts in this
    process tree's, which ``others_busy_cores`` takes out of the machine's."""
    import subprocess
    import sys

    from ptqlib.engine import record

    hz = os.sysconf("SC_CLK_TCK")
    before = record._tree_jiffies(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "import time\nt = time.process_time()\n"
                              "while time.process_time() - t < 0.6: pass\nprint('burnt', flush=True)\ntime.sleep(30)"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "burnt\n"  # it has burnt its 0.6 s of CPU and sleeps, still alive
        spent = (record._tree_jiffies(os.getpid()) - before) / hz
    finally:
        child.kill()
        child.wait()
        child.stdout.close()  # the pipe the "burnt" line came through
    assert spent >= 0.5
    assert record._tree_jiffies(os.getpid() + 10**7) == 0  # no such process: nothing
    busy = record.others_busy_cores(0.2)
    assert busy is not None and 0.0 <= busy <= os.cpu_count() + 0.5


def test_the_commit_is_dirty_only_where_the_library_changed(tmp_path):
    """A report or study file the run itself writes does not mark its commit dirty; a change to the package or
    its notebooks does."""
    import subprocess

    from ptqlib.engine.record import git_commit

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    for d in ("ptqlib", "notebooks", "reports"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "f.txt").write_text("0")
    git("init", "-q")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    clean = git_commit(tmp_path)
    assert clean and not clean.endswith("-dirty")
    (tmp_path / "reports" / "f.txt").write_text("1")
    assert git_commit(tmp_path) == clean
    (tmp_path / "notebooks" / "f.txt").write_text("1")
    assert git_commit(tmp_path) == clean + "-dirty"

"""The record writer: atomic, complete, readable by the group like the other outputs."""
import json
import os
import stat

from ptqlib.record import read_json, write_json_atomic


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
    from ptqlib.record import complete, read_json
    from ptqlib.stage import finished

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

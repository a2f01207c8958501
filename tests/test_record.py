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

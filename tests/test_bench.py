"""bench/study_time.py: a study's recorded stage time per kind, and the ratio of two studies."""
import importlib.util
from pathlib import Path

import pytest

from ptqlib.engine.runner import Runner
from ptqlib.files import write_json_atomic
from ptqlib.study.schema import load_study

ROOT = Path(__file__).resolve().parents[1]
STUDY = """model: tiny
seeds: [0, 1]
defaults: {finetune: {precision: fp32}, evaluate: {precision: fp32}}
pipelines:
  ft16: [{finetune: {method: full, steps: STEPS}}]
"""


def _study_time():
    spec = importlib.util.spec_from_file_location("study_time", ROOT / "bench" / "study_time.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _recorded(tmp_path, steps: int, walls: dict[str, float], skip: int = 0) -> Path:
    """A study file whose stages are recorded with ``walls[kind]`` seconds (the last ``skip`` not)."""
    f = tmp_path / f"steps{steps}.yaml"
    f.write_text(STUDY.replace("STEPS", str(steps)))
    r = Runner(load_study(f), tmp_path / "runs", tmp_path / "reports")
    sids = r.plan()
    for sid in sids[: len(sids) - skip]:
        n = r.nodes[sid]
        write_json_atomic(r.runs / sid / "metrics.json", {
            "status": "ok", "kind": n.kind, "label": n.label(), "params": n.params,
            "metrics": {"train_seconds": walls[n.kind] * 0.6} if n.kind == "finetune" else {"gen_seconds": 1.0},
            "timings": {"wall_s": walls[n.kind]}, "device": {"torch_threads": 2}})
    return f


def test_study_time_sums_recorded_stages_per_kind_and_gives_the_ratio(tmp_path, capsys):
    st = _study_time()
    a = _recorded(tmp_path, 4, {"finetune": 10.0, "evaluate": 5.0})
    b = _recorded(tmp_path, 5, {"finetune": 25.0, "evaluate": 6.0}, skip=1)  # one stage not finished
    t = st.stage_times(str(a), str(tmp_path / "runs"))
    assert t["planned"] == t["recorded"] == 4 and t["seconds"] == {"finetune": 20.0, "evaluate": 10.0}
    assert t["compute"] == {"finetune": 12.0, "evaluate": 2.0}  # the work the stages timed themselves
    assert t["precision"] == "fp32" and t["threads"] == "2"
    assert st.main([str(a), str(b), "--runs", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert "3 of 4 stages recorded; precision fp32" in out
    assert "| finetune | 20 | 50 | 2.50x |" in out and "| total | 30 | 56 | 1.87x |" in out
    assert "| finetune | 12 / 8 | 30 / 20 |" in out  # the work the stages timed / the rest
    with pytest.raises(SystemExit):
        st.main([str(a), str(b), "--runs", "r1", "r2", "r3"])
    assert "one per study (2); got 3" in capsys.readouterr().err

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


def _compare():
    spec = importlib.util.spec_from_file_location("compare_commits", ROOT / "bench" / "compare_commits.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_compare_commits_weighs_the_studys_stage_mix(tmp_path):
    """The smoke study's units: each evaluate stage's examples and windows (the first KL stage of each
    16-bit reference cold, the others warm), each training stage's steps, each GPTQ stage's layers."""
    mix = _compare().stage_mix(str(ROOT / "parameters" / "smoke.yaml"))
    study = load_study(ROOT / "parameters" / "smoke.yaml")
    r = Runner(study, tmp_path / "runs", ROOT / "reports")
    evals = [r.nodes[s] for s in r.plan() if r.nodes[s].kind == "evaluate"]
    refs = {n.reference for n in evals if n.reference is not None}
    assert mix["generation"] == 4 * len(evals) and len(refs) >= 1
    assert mix["kl_cold"] == 4 * 2 * len(refs) and mix["kl"] == 4 * 2 * (sum(n.reference is not None for n in evals) - len(refs))
    assert mix["ppl"] == 4 * 2 * sum(n.reference is None for n in evals)
    assert mix["full"] == 4 and mix["qlora"] == 2 * 4 and mix["gptq"] == 2  # the tiny model has 2 layers


def test_compare_commits_ends_with_the_four_ratios():
    cc = _compare()
    a = {"generation": 0.4, "ppl": 0.2, "kl": 0.6, "kl_cold": 0.6, "full": 4.0, "qlora": 3.0, "l4q": 4.0, "gptq": 2.0}
    b = {**a, "generation": 0.2, "kl": 0.3, "full": 2.0}
    mix = cc.Counter({"generation": 100, "kl": 10, "kl_cold": 10, "full": 5, "gptq": 10})
    lines = cc.report("A", "B", a, b, mix)
    assert [ln.split(":")[0] for ln in lines[-4:]] == ["generation", "perplexity", "training", "study stage time"]
    assert lines[-4] == "generation: 2.00x" and lines[-3] == f"perplexity: {12 / 9:.2f}x"
    assert lines[-2] == f"training: {2 ** (1 / 3):.2f}x"
    assert lines[-1] == f"study stage time: {(40 + 6 + 6 + 20 + 20) / (20 + 3 + 6 + 10 + 20):.2f}x"


def test_compare_commits_refuses_what_is_not_a_commit(capsys):
    with pytest.raises(SystemExit) as e:
        _compare().main(["no-such-commit-xyz", "HEAD"])  # refused before HEAD is looked at
    assert e.value.code == 2 and "'no-such-commit-xyz' is not a commit" in capsys.readouterr().err

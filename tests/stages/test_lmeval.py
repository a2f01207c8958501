"""ptqlib.stages.lmeval: lm-evaluation-harness on the tiny model with a local, offline task.

Tests that run lm-eval are skipped when it is not installed (it is the optional ``lmeval``
extra); preset expansion and the missing-package error are tested either way.
"""
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from ptqlib.stages.lmeval import PRESETS, expand_tasks, flatten_results

DATA = Path(__file__).resolve().parents[1] / "data" / "lmeval"
TASK = "ptqlib_mc_tiny"


@pytest.fixture(scope="module")
def lm_eval():
    return pytest.importorskip("lm_eval")


def _write_task(folder: Path, name: str, rows: list[dict], cache: Path) -> None:
    """The shipped YAML with an absolute data path: lm-eval resolves data_files against the
    current directory, so the test must not depend on where pytest was started."""
    cfg = yaml.safe_load((DATA / f"{TASK}.yaml").read_text())
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg["task"] = name
    cfg["dataset_kwargs"] = {"data_files": {"test": str(data)}, "cache_dir": str(cache)}
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(cfg))


def _rows() -> list[dict]:
    return [json.loads(line) for line in (DATA / f"{TASK}.jsonl").read_text().splitlines() if line.strip()]


def _oracle_rows() -> list[dict]:
    """Same questions, but the right choice is always 'yes' and the wrong ones are other words."""
    wrong = ["no", "maybe", "never"]
    rows = []
    for r in _rows():
        choices = wrong[: len(r["choices"]) - 1]
        choices.insert(r["answer"], "yes")
        rows.append({**r, "choices": choices})
    return rows


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, lm_eval):
    folder = tmp_path_factory.mktemp("lmeval_tasks")
    cache = tmp_path_factory.mktemp("hf_datasets_cache")  # keeps ~/.cache/huggingface untouched
    _write_task(folder, TASK, _rows(), cache)
    _write_task(folder, "ptqlib_mc_oracle", _oracle_rows(), cache)
    return str(folder)


@pytest.fixture(scope="module")
def tiny(lm_eval):
    from ptqlib.models import load_model

    return load_model("tiny", device="cpu")


def test_presets_expand():
    assert expand_tasks(["commonsense"]) == PRESETS["commonsense"]
    assert len(PRESETS["commonsense"]) == 7
    # A preset that is also a task name maps to itself; duplicates are dropped, order kept.
    expected = ["mmlu", "piqa"] + [t for t in PRESETS["commonsense"] if t != "piqa"]
    assert expand_tasks(["mmlu", "piqa", "commonsense", "piqa"]) == expected
    assert expand_tasks("mmlu") == ["mmlu"]
    assert expand_tasks(["my_local_task"]) == ["my_local_task"]


def test_missing_lm_eval_gives_install_hint(monkeypatch):
    from ptqlib.stages.lmeval import run_lm_eval

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` raise ImportError
    with pytest.raises(ImportError, match=r"pip install -e '\.\[lmeval\]'"):
        run_lm_eval(None, None, ["mmlu"])


def test_flatten_results_keeps_numbers_only():
    res = {"results": {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": "N/A",
                             "exact_match,strict-match": 1, "sample_len": 4}},
           "n-samples": {"t": {"original": 10, "effective": 4}}}
    assert flatten_results(res) == {"lmeval.t.acc": 0.5, "lmeval.t.exact_match.strict-match": 1.0,
                                    "lmeval.t.n_samples": 4.0}


def test_unknown_task_names_raise(task_dir):
    from ptqlib.stages.lmeval import run_lm_eval

    # include_defaults=False: only the local folder is indexed, so this fails in well under 1 s.
    with pytest.raises(ValueError, match=r"no_such_task.*lm-eval ls tasks") as err:
        run_lm_eval(None, None, [TASK, "no_such_task", "ptqlib_mc_tinny"], include_path=task_dir,
                    include_defaults=False)
    assert "ptqlib_mc_tinny" in str(err.value) and "did you mean" in str(err.value)
    with pytest.raises(ValueError, match="no lm-eval tasks"):
        run_lm_eval(None, None, [], include_path=task_dir, include_defaults=False)


def test_local_task_runs_offline_and_is_deterministic(tiny, task_dir):
    from ptqlib.stages.lmeval import run_lm_eval

    model, tok = tiny
    first = run_lm_eval(model, tok, [TASK], include_path=task_dir, batch_size=4)
    acc = first[f"lmeval.{TASK}.acc"]
    assert 0.0 <= acc <= 1.0 and 0.0 <= first[f"lmeval.{TASK}.acc_norm"] <= 1.0
    assert first[f"lmeval.{TASK}.n_samples"] == len(_rows())
    assert all(k.startswith(f"lmeval.{TASK}.") and isinstance(v, float) for k, v in first.items())
    assert run_lm_eval(model, tok, [TASK], include_path=task_dir, batch_size=4) == first

    limited = run_lm_eval(model, tok, [TASK], include_path=task_dir, limit=3)
    assert limited[f"lmeval.{TASK}.n_samples"] == 3


def test_scores_the_model_object_in_place(tiny, task_dir):
    """Biasing the in-memory model towards 'yes' (the right choice) gives acc 1, towards 'no' 0:
    lm-eval scores this very object (hooks, adapters, quantized layers) and maps targets right."""
    from ptqlib.stages.lmeval import run_lm_eval

    model, tok = tiny
    ids = {w: set(tok(" " + w, add_special_tokens=False)["input_ids"]) for w in ["yes", "no", "maybe", "never"]}
    assert not ids["yes"] & (ids["no"] | ids["maybe"] | ids["never"])  # the bias must not help a wrong choice

    def run_biased(word: str) -> float:
        bias = torch.zeros(model.config.vocab_size)
        bias[list(ids[word])] = 40.0
        handle = model.lm_head.register_forward_hook(lambda mod, args, out: out + bias.to(out))
        try:
            return run_lm_eval(model, tok, ["ptqlib_mc_oracle"], include_path=task_dir)["lmeval.ptqlib_mc_oracle.acc"]
        finally:
            handle.remove()

    assert run_biased("yes") == 1.0
    assert run_biased("no") == 0.0  # every question has 'no' among its wrong choices


def test_per_item_units_are_the_items_of_the_aggregate(tiny, task_dir):
    """With ``units``, lm-eval logs its samples and each task's accuracies become per-item units in doc order,
    whose mean is lm-eval's own aggregate (so a claim pairs the same items across pipelines)."""
    from ptqlib.stages.lmeval import run_lm_eval

    model, tok = tiny
    units: dict = {}
    flat = run_lm_eval(model, tok, [TASK], include_path=task_dir, batch_size=4, units=units)
    cols = units[f"lmeval.{TASK}"]
    assert set(cols) == {f"lmeval.{TASK}.acc", f"lmeval.{TASK}.acc_norm"}
    for name, items in cols.items():
        assert len(items) == len(_rows()) and set(items) <= {0.0, 1.0}
        assert sum(items) / len(items) == pytest.approx(flat[name], abs=1e-12)


def test_a_corpus_level_metric_stays_a_run_number():
    from ptqlib.stages.lmeval import sample_units

    samples = {"t": [{"doc_id": i, "filter": "none", "metrics": ["acc", "bleu"], "acc": float(i % 2), "bleu": 0.5}
                     for i in (2, 0, 1, 3)]}
    units = sample_units(samples, {"lmeval.t.acc": 0.5, "lmeval.t.bleu": 0.31})  # bleu is no mean of its items
    assert units == {"lmeval.t": {"lmeval.t.acc": [0.0, 1.0, 0.0, 1.0]}}  # doc order


def test_a_claim_on_an_lm_eval_metric_pairs_its_items():
    """Per-item units turn an lm-eval claim from a comparison of run means into a paired one over items."""
    import numpy as np
    import pandas as pd

    from ptqlib.report.claims import check_claims

    rng = np.random.default_rng(0)
    hard = rng.random(200) < 0.5  # items both pipelines find hard
    rows, units = [], []
    for fam, p_easy in (("a", 0.95), ("b", 0.85)):
        for seed in range(3):
            acc = np.where(hard, rng.random(200) < 0.3, rng.random(200) < p_easy).astype(float)
            rows.append({"pipeline": f"{fam}[seed={seed}]", "family": fam, "seed": seed, "status": "ok",
                         "stages": "finetune(lora) -> evaluate", "lmeval.mc.acc": acc.mean()})
            units += [{"pipeline": f"{fam}[seed={seed}]", "family": fam, "seed": seed, "group": "lmeval.mc",
                       "unit": i, "lmeval.mc.acc": v} for i, v in enumerate(acc)]
    claim = [{"claim": "c", "a": "a", "b": "b", "metric": "lmeval.mc.acc", "relation": ">"}]
    paired = check_claims(claim, pd.DataFrame(rows), pd.DataFrame(units)).iloc[0]
    runs_only = check_claims(claim, pd.DataFrame(rows), None).iloc[0]
    assert paired["n_examples"] == 200 and runs_only["n_examples"] == 0
    assert paired["difference"] == pytest.approx(runs_only["difference"])


def test_the_evaluate_stage_records_the_items_beside_the_task_examples(tiny, task_dir, tmp_path):
    from ptqlib.stages import evaluate
    from ptqlib.study.params import EvaluateParams

    model, tok = tiny
    p = EvaluateParams(ppl_samples=2, ppl_seq_len=32, ppl_sources=[], task_samples=0, kl_reference=False, precision="fp32",
                       lm_eval_tasks=[TASK], lm_eval_include=task_dir, batch_size=4)
    metrics, _, units = evaluate.run_stage(model, tok, "tiny", [], p, tmp_path)
    items = units[f"lmeval.{TASK}"][f"lmeval.{TASK}.acc"]
    assert len(items) == len(_rows()) and sum(items) / len(items) == pytest.approx(metrics[f"lmeval.{TASK}.acc"])

"""Every random draw of a stage is a function of (pipeline seed, stage): ptqlib.seeding."""
from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

from ptqlib.seeding import SCHEME, derive_seed
from ptqlib.study.params import FinetuneParams

ADAPTER_METHODS = ["lora", "l4q", "qblora"]


def _initial_adapter(model, method: str, seed: int) -> dict[str, torch.Tensor]:
    from ptqlib.quant import rtn_quantize_model
    from ptqlib.stages import finetune

    m = copy.deepcopy(model)
    if method == "qblora":  # balanced adapters sit on a quantized base
        rtn_quantize_model(m, bits=4, group_size=32, progress=False)
    m = finetune.prepare(m, method, FinetuneParams(method=method), seed=seed)
    return {k: v.detach().clone() for k, v in m.named_parameters() if v.requires_grad and "lora_A" in k}


@pytest.mark.parametrize("method", ADAPTER_METHODS)
def test_the_adapter_is_the_same_after_any_earlier_work(tiny, method):
    """The process's RNG state before prepare (other stages, other tests) does not reach the adapter."""
    model, _ = tiny
    torch.manual_seed(123)
    first = _initial_adapter(model, method, seed=3)
    torch.randn(1000)  # earlier work that draws
    torch.manual_seed(99)
    second = _initial_adapter(model, method, seed=3)
    assert first and first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("method", ADAPTER_METHODS)
def test_two_seeds_draw_two_adapters(tiny, method):
    model, _ = tiny
    a, b = _initial_adapter(model, method, seed=0), _initial_adapter(model, method, seed=1)
    assert all(not torch.equal(a[k], b[k]) for k in a)


def test_the_adapter_draw_is_not_the_training_draw():
    """Init and training order are separate streams of one seed, and each is stable across processes."""
    assert derive_seed(0, "finetune", "lora", "init") != derive_seed(0, "finetune", "qlora", "init")
    assert derive_seed(0, "finetune", "lora", "init") != derive_seed(1, "finetune", "lora", "init")
    code = "from ptqlib.seeding import derive_seed; print(derive_seed(7, 'finetune', 'lora', 'init'))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": "12345", "PATH": ""})
    assert int(other.stdout) == derive_seed(7, "finetune", "lora", "init")
    assert 0 <= derive_seed(2**40, "x") < 2**32


@pytest.mark.parametrize("bad", [-1, 1.5, True, "0"])
def test_a_bad_seed_is_refused_naming_it(bad):
    with pytest.raises(ValueError, match="seed"):
        derive_seed(bad, "finetune")


def _record(method: str, rng: str | None) -> dict:
    rec = {"kind": "finetune", "status": "ok", "metrics": {}, "timings": {"wall_s": 1.0},
           "params": {"method": method}, "label": f"finetune({method})"}
    if rng:
        rec["rng"] = rng
    return rec


@pytest.mark.parametrize("method, rng, counts", [
    ("lora", None, False),  # an adapter drawn from the process's RNG: re-run
    ("qablora", None, False),
    ("lora", SCHEME, True),
    ("full", None, True),  # full fine-tuning draws no initial weights: its old records stand
])
def test_records_of_unseeded_adapters_do_not_count_as_finished(tmp_path, method, rng, counts):
    from ptqlib.engine.stage import usable

    (tmp_path / "abc").mkdir()
    assert usable(tmp_path, "abc", _record(method, rng)) is counts

"""The finetune stage's training loop: a quantized base's kept weights change speed and memory, never the weights."""
from __future__ import annotations

import copy

import pytest
import torch

from ptqlib import precision
from ptqlib.study.params import FinetuneParams


@pytest.mark.parametrize("prec", ["fp32", "bf16"])
def test_keeping_the_bases_dequantized_weights_trains_the_same_adapter(tiny, monkeypatch, prec):
    """QLoRA on a 4-bit QuantLinear base, 3 steps with base_cache on and off (the default): every adapter weight and logged loss
    equal bit for bit; on, the kept weights' size is recorded (the memory it costs), off, 0."""
    from ptqlib.data import load_task, sft_features
    from ptqlib.quant import rtn_quantize_model
    from ptqlib.stages import finetune

    monkeypatch.setenv(precision.FORCE_ENV, "1")
    model, tok = tiny
    base = copy.deepcopy(model)
    rtn_quantize_model(base, bits=4, group_size=32, progress=False)
    feats = sft_features(tok, load_task("meetings", "train", 8), 128)
    runs = []
    for cache in (True, False):
        p = FinetuneParams(method="qlora", steps=3, batch_size=2, lr=1e-3, precision=prec, base_cache=cache)
        m = finetune.prepare(copy.deepcopy(base), "qlora", p, seed=0)
        out = finetune.train(m, tok, feats, p, seed=0)
        runs.append((out, {n: t.detach().clone() for n, t in m.named_parameters() if t.requires_grad}))
    (on, w_on), (off, w_off) = runs
    assert on["loss_history"] == off["loss_history"] and w_on.keys() == w_off.keys()
    assert all(torch.equal(w_on[n], w_off[n]) for n in w_on)
    n_weights = sum(mod.in_features * mod.out_features for mod in base.modules() if hasattr(mod, "qweight"))
    assert on["metrics"]["base_cache_mb"] == n_weights * (2 if prec == "bf16" else 4) / 2**20
    assert off["metrics"]["base_cache_mb"] == 0

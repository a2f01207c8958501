"""The precision setting: resolution on the hardware, stage ids, and bf16 numerics against fp32."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from ptqlib import precision
from ptqlib.errors import ConfigError
from ptqlib.study.params import FinetuneParams
from ptqlib.study.schema import load_study


@pytest.fixture
def no_bf16(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    monkeypatch.setattr(precision, "_cuda_device", lambda: False)
    monkeypatch.delenv(precision.FORCE_ENV, raising=False)


@pytest.fixture
def has_bf16(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))
    monkeypatch.setattr(precision, "_cuda_device", lambda: False)


def test_auto_is_bf16_only_where_native(no_bf16, monkeypatch):
    assert precision.resolve("auto") == "fp32"
    assert precision.resolve("fp32") == "fp32"
    with pytest.raises(ConfigError, match=r"'bf16'.*avx512_bf16 / amx_bf16.*none found.*PTQLIB_FORCE_BF16"):
        precision.resolve("bf16")
    monkeypatch.setenv(precision.FORCE_ENV, "1")
    assert precision.resolve("bf16") == "bf16"
    with pytest.raises(ConfigError, match=r"precision: 'fp16' is not valid; valid: auto, fp32, bf16"):
        precision.resolve("fp16")


def test_amx_counts_as_native(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"amx_bf16", "amx_tile"}))
    monkeypatch.setattr(precision, "_cuda_device", lambda: False)
    assert precision.resolve("auto") == "bf16"


def _write(tmp_path, text: str):
    f = tmp_path / "s.yaml"
    f.write_text(text)
    return f


def test_study_resolves_auto_and_fp32_keeps_the_ids_of_cached_stages(tmp_path, has_bf16):
    from ptqlib.study.graph import build_graph

    body = ("pipelines:\n  ft: [{finetune: full}]\n  q: [{quantize: {method: rtn, group_size: 32}}]\n")
    auto = load_study(_write(tmp_path, "model: tiny\n" + body))
    params = {p.name: [st.params["precision"] for st in p.stages] for p in auto.pipelines}
    assert params == {"ft": ["bf16", "bf16"], "q": ["bf16", "bf16"]}
    fp32 = load_study(_write(tmp_path, "model: tiny\ndefaults:\n  finetune: {precision: fp32}\n"
                                       "  evaluate: {precision: fp32}\n  quantize: {precision: fp32}\n" + body))
    _, c_auto = build_graph(auto)
    _, c_fp32 = build_graph(fp32)
    # bf16 finetune and evaluate stages are new computations; RTN has no forward, so its id stays
    assert c_auto["ft"][0] != c_fp32["ft"][0] and c_auto["ft"][1] != c_fp32["ft"][1]
    assert c_auto["q"][0] == c_fp32["q"][0] and c_auto["q"][1] != c_fp32["q"][1]
    # fp32 is what every stage computed before the setting existed: the ids without the key
    from ptqlib.study.graph import stage_id

    ev = {k: v for k, v in fp32.pipelines[0].stages[0].params.items() if k != "precision"}
    assert stage_id("finetune", ev, None, "tiny", "meetings", 0) == c_fp32["ft"][0]


def test_bf16_on_hardware_without_it_is_refused_before_any_stage(tmp_path, no_bf16):
    with pytest.raises(ConfigError, match=r"s.yaml: pipelines.a\[0\].finetune.precision: 'bf16' asked for.*avx512_bf16"):
        load_study(_write(tmp_path, "model: tiny\npipelines:\n  a: [{finetune: {method: full, precision: bf16}}]\n"))


def test_each_seed_is_its_own_calibration_draw(tmp_path):
    """GPTQ on an untrained model: one quantize stage per seed (calib_seed = the pipeline's seed);
    NF4 draws nothing and runs once; a pinned calib_seed is one draw for all seeds."""
    from ptqlib.engine.runner import Runner
    from ptqlib.study.graph import build_graph

    text = ("model: tiny\nseeds: [0, 1, 2]\ndefaults:\n  quantize: {group_size: 32}\npipelines:\n"
            "  base: []\n  gptq: [{quantize: gptq}]\n  nf4: [{quantize: nf4}]\n"
            "  pinned: [{quantize: {method: gptq, calib_seed: 0}}]\n")
    study = load_study(_write(tmp_path, text))
    names = [p.name for p in study.pipelines]
    assert names == ["base", "gptq[seed=0]", "gptq[seed=1]", "gptq[seed=2]", "nf4", "pinned"]
    nodes, chains = build_graph(study)
    q = {chains[n][0] for n in names if n.startswith("gptq")}
    assert len(q) == 3 and sorted(nodes[s].params["calib_seed"] for s in q) == [0, 1, 2]
    assert nodes[chains["nf4"][0]].params["calib_seed"] == 0
    # seed 0's draw is the stage the fixed calib_seed 0 computed before: same id
    assert chains["gptq[seed=0]"][0] == chains["pinned"][0]
    plan = Runner(study, tmp_path / "runs", tmp_path / "reports").describe()
    assert plan.count("quantize(gptq") == 4  # three draws + the pinned one


def test_bf16_evaluation_agrees_with_fp32(tiny, monkeypatch):
    """Perplexity of the tiny model in bf16 within 1% of fp32 (bf16 has 8 significand bits; the
    logits' log-softmax is taken in fp32), and QuantLinear keeps its scales' dtype."""
    from ptqlib.quant import QuantLinear, rtn_quantize_model
    from ptqlib.stages.evaluate import perplexity
    from ptqlib.text import text_windows

    monkeypatch.setenv(precision.FORCE_ENV, "1")
    model, tok = tiny
    windows = text_windows(tok, "test", 64, 8)
    quantized = copy.deepcopy(model)
    rtn_quantize_model(quantized, bits=4, group_size=32, progress=False)
    for m in (copy.deepcopy(model), quantized):
        p32 = perplexity(m, windows)
        stored = [q.scales.dtype for q in m.modules() if isinstance(q, QuantLinear)]
        precision.cast_for_inference(m, "bf16")
        assert all(p.dtype == torch.bfloat16 for p in m.parameters())
        # scales as stored: the layer de-quantizes in the input's dtype
        assert [q.scales.dtype for q in m.modules() if isinstance(q, QuantLinear)] == stored
        p16 = perplexity(m, windows)
        assert math.isfinite(p16) and abs(p16 / p32 - 1) < 0.01, (p32, p16)


def test_bf16_training_agrees_with_fp32_and_says_so(tiny, monkeypatch):
    """Three full-FT steps under bf16 autocast: master weights stay fp32, the loss history within
    2% of fp32's, and the metrics name the precision that ran. bf16 steps with the fused AdamW
    kernel, fp32 (the exact path) with torch's per-tensor one."""
    from transformers import TrainerCallback

    from ptqlib.data import load_task, sft_features
    from ptqlib.stages import finetune

    fused = {}

    class Optimizer(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, **kw):
            fused[prec] = bool(optimizer.defaults.get("fused"))

    monkeypatch.setenv(precision.FORCE_ENV, "1")
    model, tok = tiny
    feats = sft_features(tok, load_task("meetings", "train", 8), 128)
    out = {}
    for prec in ("fp32", "bf16"):
        m = finetune.prepare(copy.deepcopy(model), "full", FinetuneParams(method="full"))
        p = FinetuneParams(method="full", steps=3, batch_size=2, lr=1e-3, precision=prec)
        res = finetune.train(m, tok, feats, p, seed=0, callbacks=[Optimizer()])
        assert res["metrics"]["precision"] == prec
        assert all(w.dtype == torch.float32 for w in m.parameters())  # fp32 master weights
        out[prec] = [l for _, l in res["loss_history"]]
    assert len(out["bf16"]) == 3
    for a, b in zip(out["fp32"], out["bf16"]):
        assert abs(a - b) / a < 0.02, out
    assert fused == {"fp32": False, "bf16": True}


def test_auto_can_be_resolved_as_another_machine_did(no_bf16, monkeypatch):
    """PTQLIB_AUTO_PRECISION (precision.auto_as): what ``auto`` resolves to when a report made elsewhere is read;
    an explicit bf16 stays refused where it is not native, a bad value is named."""
    with precision.auto_as("bf16"):
        assert precision.resolve("auto") == "bf16"
        with pytest.raises(ConfigError, match="'bf16' asked for"):
            precision.resolve("bf16")
    assert precision.resolve("auto") == "fp32" and precision.AUTO_ENV not in __import__("os").environ
    monkeypatch.setenv(precision.AUTO_ENV, "fp16")
    with pytest.raises(ConfigError, match=r"PTQLIB_AUTO_PRECISION='fp16' is not valid; valid: fp32, bf16"):
        precision.resolve("auto")

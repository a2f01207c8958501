"""LoftQ's start: the adapter is the best rank-r correction of the NF4 error, on the PTQ stage's own codes."""
import pytest
import torch

from ptqlib import artifacts
from ptqlib.stages import finetune
from ptqlib.stages import quantize as ptq
from ptqlib.study.params import FinetuneParams, QuantizeParams


def _params(**kw):
    return FinetuneParams(**{"method": "loftq", "rank": 4, "alpha": 8.0, "steps": 1, **kw}).__dict__


@pytest.fixture(scope="module")
def nf4_run(tmp_path_factory):
    """An nf4 stage's output made from the tiny model, as the runner leaves it."""
    out = tmp_path_factory.mktemp("runs") / "nf4"
    p = QuantizeParams(method="nf4").__dict__
    model, tok, _ = ptq.quantize("tiny", p)
    ptq.save(model, tok, p, out, "tiny")
    return out


def _layers(model):
    from peft.tuners.lora.bnb import Linear4bit

    return {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}


def test_start_is_the_eckart_young_optimum(nf4_run):
    from bitsandbytes.functional import dequantize_4bit

    model, _, _ = artifacts.load(nf4_run, "cpu")
    model = finetune.prepare(model, "loftq", _params(), str(nf4_run))
    float_model, _, _ = artifacts.load("tiny", "cpu")
    fp = dict(float_model.named_modules())
    layers = _layers(model)
    assert len(layers) == 7 * float_model.config.num_hidden_layers
    for name, m in layers.items():
        W = fp[name.removeprefix("base_model.model.")].weight.float()
        qw = m.get_base_layer().weight
        Q = dequantize_4bit(qw.data, qw.quant_state).float()
        s, r = m.scaling["default"], m.r["default"]
        assert s == 2.0  # alpha 8 / rank 4: the scale must be divided out, not ignored
        BA = m.lora_B["default"].weight @ m.lora_A["default"].weight
        left = torch.linalg.norm(W - Q - s * BA) ** 2
        S = torch.linalg.svdvals(W - Q)
        assert torch.allclose(left, (S[r:] ** 2).sum(), rtol=1e-4), name  # the least a rank-r start can leave
        assert left < 0.95 * torch.linalg.norm(W - Q) ** 2


def test_matches_peft_decomposition_at_unit_scale(nf4_run):
    """At s = 1 the factors are peft's (_low_rank_decomposition: B = U sqrt(S), A = sqrt(S) V^T)."""
    from bitsandbytes.functional import dequantize_4bit
    from peft.utils.loftq_utils import _low_rank_decomposition

    model, _, _ = artifacts.load(nf4_run, "cpu")
    model = finetune.prepare(model, "loftq", _params(alpha=4.0), str(nf4_run))
    fp = dict(artifacts.load("tiny", "cpu")[0].named_modules())
    name, m = next(iter(_layers(model).items()))
    W = fp[name.removeprefix("base_model.model.")].weight.float()
    qw = m.get_base_layer().weight
    ref = _low_rank_decomposition(W - dequantize_4bit(qw.data, qw.quant_state).float(), reduced_rank=4)
    BA = m.lora_B["default"].weight @ m.lora_A["default"].weight
    assert torch.allclose(BA, ref["L"] @ ref["R"], atol=1e-5)


def test_start_is_closer_to_the_float_model_and_round_trips(nf4_run, tmp_path):
    x = torch.randint(0, 1024, (2, 16))
    with torch.no_grad():
        ref = artifacts.load("tiny", "cpu")[0](x).logits
        qlora = finetune.prepare(artifacts.load(nf4_run, "cpu")[0], "qlora", _params(method="qlora"), str(nf4_run))
        loftq = finetune.prepare(artifacts.load(nf4_run, "cpu")[0], "loftq", _params(), str(nf4_run))
        e_qlora = torch.linalg.norm(qlora(x).logits - ref)
        out = loftq(x).logits
        e_loftq = torch.linalg.norm(out - ref)
    assert e_loftq < e_qlora  # the start already undoes part of the quantization error
    tok = artifacts.load("tiny", "cpu")[1]
    info = finetune.save(loftq, tok, "loftq", _params(), tmp_path / "run", str(nf4_run))
    assert info["type"] == "peft" and artifacts.is_quantized(tmp_path / "run")
    loaded, _, _ = artifacts.load(tmp_path / "run", "cpu")
    with torch.no_grad():
        assert torch.allclose(loaded(x).logits, out, atol=1e-5)


def _start(nf4_run, iters):
    from bitsandbytes.functional import dequantize_4bit

    model = finetune.prepare(artifacts.load(nf4_run, "cpu")[0], "loftq", _params(loftq_iter=iters), str(nf4_run))
    fp = dict(artifacts.load("tiny", "cpu")[0].named_modules())
    out = {}
    for name, m in _layers(model).items():
        W = fp[name.removeprefix("base_model.model.")].weight.float()
        qw = m.get_base_layer().weight
        Q = dequantize_4bit(qw.data, qw.quant_state).float()
        BA = m.lora_B["default"].weight @ m.lora_A["default"].weight
        out[name] = (W, Q, m.scaling["default"] * BA)
    return model, out


def test_more_iterations_requantize_the_base_and_shrink_the_error(nf4_run):
    """T alternating steps: the base becomes q(W - s B A) (new codes), the adapter stays the rank-r optimum for
    the base it ends on, and the error the start leaves shrinks from T = 1 to 2 to 5 (on the tiny model)."""
    _, one = _start(nf4_run, 1)
    errors = {}
    for iters in (2, 5):
        _, layers = _start(nf4_run, iters)
        moved = 0
        for name, (W, Q, sBA) in layers.items():
            S = torch.linalg.svdvals(W - Q)
            assert torch.allclose(torch.linalg.norm(W - Q - sBA) ** 2, (S[4:] ** 2).sum(), rtol=1e-4), name
            moved += not torch.equal(Q, one[name][1])
        assert moved == len(layers)  # every layer's codes are LoftQ's now, not the PTQ stage's
        errors[iters] = sum(torch.linalg.norm(W - Q - sBA) for W, Q, sBA in layers.values()).item()
    errors[1] = sum(torch.linalg.norm(W - Q - sBA) for W, Q, sBA in one.values()).item()
    assert errors[5] < errors[2] < errors[1]


@pytest.mark.parametrize("merge", [False, True])
def test_a_requantized_base_is_saved_with_the_stage_and_loads_back(nf4_run, tmp_path, merge):
    model, _ = _start(nf4_run, 2)
    x = torch.randint(0, 1024, (2, 16))
    with torch.no_grad():
        out = model(x).logits
    tok = artifacts.load("tiny", "cpu")[1]
    info = finetune.save(model, tok, "loftq", _params(loftq_iter=2, merge=merge), tmp_path / "run", str(nf4_run))
    if merge:
        assert info["type"] == "hf"  # folded into the de-quantized LoftQ base, not the PTQ stage's
    else:
        assert info["base"] == "base" and artifacts.describe(tmp_path / "run" / "base")["type"] == "bnb"
        assert artifacts.is_quantized(tmp_path / "run")
    loaded, _, _ = artifacts.load(tmp_path / "run", "cpu")
    if not merge:  # the stage keeps its 4-bit weights in the stored layout (bnb's unfused path): so does this
        from ptqlib.methods.lora import keep_bnb_layout

        keep_bnb_layout(loaded)
    with torch.no_grad():
        assert torch.allclose(loaded(x).logits, out, atol=1e-4)


def test_float_source_found_for_records_without_it(nf4_run, tmp_path):
    """Stages cached before artifact.json named its input: the runner's record names it."""
    import json
    import shutil

    old = tmp_path / "abc"
    shutil.copytree(nf4_run, old)
    info = json.loads((old / "artifact.json").read_text())
    del info["input"]
    (old / "artifact.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="does not say which input"):
        artifacts.input_of(old)
    (old / "metrics.json").write_text(json.dumps({"input": None, "model": "tiny"}))
    assert artifacts.input_of(old) == "tiny"
    (tmp_path / "f00d").mkdir()
    (old / "metrics.json").write_text(json.dumps({"input": "f00d", "model": "tiny"}))
    assert artifacts.input_of(old) == str((tmp_path / "f00d").resolve())


@pytest.mark.parametrize("chain, error", [
    ("[{quantize: nf4}, {finetune: loftq}]", None),
    ("[{quantize: fp4}, {finetune: {method: loftq, merge: true}}, {quantize: {method: gptq, bits: 3}}]", None),
    ("[{quantize: {method: gptq, group_size: 32}}, {finetune: loftq}]", "needs a bitsandbytes 4-bit input"),
    ("[{finetune: loftq}]", "put a quantize stage before it"),
    ("[{quantize: nf4}, {finetune: loftq}, {quantize: rtn}]", "unmerged 'loftq' adapter"),
    ("[{quantize: nf4}, {finetune: {method: loftq, loftq_iter: 0}}]", "loftq_iter: 0 must be an integer >= 1"),
    ("[{quantize: nf4}, {finetune: {method: qlora, loftq_iter: 2}}]", "loftq_iter: 2 has no effect on method 'qlora'"),
])
def test_study_validation(tmp_path, chain, error):
    from ptqlib.errors import ConfigError
    from ptqlib.study.schema import load_study

    f = tmp_path / "s.yaml"
    f.write_text(f"model: tiny\npipelines:\n  a: {chain}\n")
    if error is None:
        assert load_study(f).pipelines[0].stages[-2].params["method"] in ("loftq", "gptq")
    else:
        with pytest.raises(ConfigError, match=error):
            load_study(f)

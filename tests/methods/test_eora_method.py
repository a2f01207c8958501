"""EoRA as a method on the tiny model: on a 4-bit RTN base its training-free start moves the model's outputs
toward the float model's, lowers every layer's output error, saves and loads as a peft adapter, and is
refused on a bitsandbytes base with its reason."""
import pytest
import torch

from ptqlib import artifacts
from ptqlib.errors import ConfigError
from ptqlib.stages import finetune
from ptqlib.stages import quantize as ptq
from ptqlib.study.params import FinetuneParams, QuantizeParams


def _params(**kw):
    return FinetuneParams(**{"method": "eora", "rank": 8, "alpha": 16.0, "steps": 0, "eora_samples": 8,
                             "eora_seq_len": 64, **kw}).__dict__


@pytest.fixture(scope="module")
def rtn_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "rtn"
    p = QuantizeParams(method="rtn", bits=3, group_size=32).__dict__
    model, tok, _ = ptq.quantize("tiny", p)
    ptq.save(model, tok, p, out, "tiny")
    return out


def test_the_start_lowers_every_layers_output_error_and_the_logit_error(rtn_run, tmp_path, capsys):
    from ptqlib.methods.eora import eora_initialise

    g = torch.Generator().manual_seed(0)  # its own draws: the global RNG is whatever earlier tests left
    x = torch.randint(0, 1024, (2, 32), generator=g)
    with torch.no_grad():
        ref = artifacts.load("tiny", "cpu")[0](x).logits
        base = artifacts.load(rtn_run, "cpu")[0](x).logits
        model = finetune.prepare(artifacts.load(rtn_run, "cpu")[0], "eora", _params(), str(rtn_run), seed=0)
        out = model(x).logits
    assert torch.linalg.norm(out - ref) < 0.9 * torch.linalg.norm(base - ref)
    assert "EoRA on 14 layers" in capsys.readouterr().out
    windows = torch.randint(0, 1024, (4, 64), generator=g)
    errors = eora_initialise(model, "tiny", windows)
    assert len(errors) == 14 and all(after < before for before, after in errors.values())
    with torch.no_grad():
        out = model(x).logits  # the start from these windows is what is saved
    tok = artifacts.load("tiny", "cpu")[1]
    result = finetune.train(model, tok, [], FinetuneParams(**_params()), seed=0)
    assert result["loss_history"] == [] and result["metrics"]["train_seconds"] == 0.0  # steps 0: nothing trains
    info = finetune.save(model, tok, "eora", _params(), tmp_path / "run", str(rtn_run))
    from ptqlib.files import write_json_atomic

    artifacts.save(tmp_path / "run", info, str(rtn_run))
    write_json_atomic(tmp_path / "run" / "metrics.json", {"status": "ok", "input": str(rtn_run)})
    with torch.no_grad():
        again = artifacts.load(tmp_path / "run", "cpu")[0](x).logits
    assert torch.allclose(again, out, atol=1e-5)


def test_two_seeds_draw_different_calibration_windows(rtn_run):
    a = finetune.prepare(artifacts.load(rtn_run, "cpu")[0], "eora", _params(), str(rtn_run), seed=0)
    b = finetune.prepare(artifacts.load(rtn_run, "cpu")[0], "eora", _params(), str(rtn_run), seed=1)
    c = finetune.prepare(artifacts.load(rtn_run, "cpu")[0], "eora", _params(), str(rtn_run), seed=0)
    wa, wb, wc = (dict(m.named_parameters())["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"]
                  for m in (a, b, c))
    assert not torch.equal(wa, wb) and torch.equal(wa, wc)


def test_a_bitsandbytes_base_is_refused_with_its_reason(tmp_path):
    from ptqlib.study.schema import load_study

    f = tmp_path / "s.yaml"
    f.write_text("model: tiny\npipelines:\n  a: [{quantize: nf4}, {finetune: {method: eora, steps: 0}}]\n")
    with pytest.raises(ConfigError, match=r"'eora' needs a uniform grid.*quantize with method rtn, gptq.*"
                                          r"on nf4 / fp4 use loftq"):
        load_study(f)
    f.write_text("model: tiny\npipelines:\n  a: [{quantize: rtn}, {finetune: {method: eora, steps: -1}}]\n")
    with pytest.raises(ConfigError, match=r"steps: -1 must be an integer >= 0"):
        load_study(f)


def test_cloq_starts_at_eoras_correction_split_evenly_and_then_trains(rtn_run):
    """CLoQ on the same calibration windows starts at EoRA's product with other factors, and its steps train it."""
    from ptqlib.data import load_task, sft_features
    from ptqlib.methods.eora import eora_initialise

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 1024, (2, 32), generator=g)
    windows = torch.randint(0, 1024, (4, 64), generator=g)
    eora = finetune.prepare(artifacts.load(rtn_run, "cpu")[0], "eora", _params(), str(rtn_run), seed=3)
    cloq = finetune.prepare(artifacts.load(rtn_run, "cpu")[0], "cloq", _params(method="cloq", steps=4, lr=1e-3),
                            str(rtn_run), seed=3)
    errors_e, errors_c = eora_initialise(eora, "tiny", windows), eora_initialise(cloq, "tiny", windows, split="even")
    assert errors_c.keys() == errors_e.keys() and all(
        errors_c[k] == pytest.approx(errors_e[k], rel=1e-6) for k in errors_e)  # the same output error left
    key = "base_model.model.model.layers.0.mlp.down_proj.lora_{}.default.weight"
    pe, pc = dict(eora.named_parameters()), dict(cloq.named_parameters())
    assert not torch.allclose(pe[key.format("B")], pc[key.format("B")])
    assert torch.allclose(pe[key.format("B")] @ pe[key.format("A")], pc[key.format("B")] @ pc[key.format("A")],
                          atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(eora(x).logits, cloq(x).logits, atol=1e-4)
    start = pc[key.format("A")].detach().clone()
    tok = artifacts.load("tiny", "cpu")[1]
    p = FinetuneParams(**_params(method="cloq", steps=4, lr=1e-3, batch_size=2, train_samples=8, max_length=128))
    result = finetune.train(cloq, tok, sft_features(tok, load_task("meetings", "train", 8), 128), p, seed=3)
    assert len(result["loss_history"]) == 4 and not torch.equal(start, pc[key.format("A")])

"""DoRA and QDoRA through peft's use_dora: a trained magnitude per column on a float or NF4 base;
the merged model equals the unmerged one; refused before any stage on GPTQ / RTN."""
import pytest
import torch

from ptqlib import artifacts
from ptqlib.errors import ConfigError
from ptqlib.stages import finetune
from ptqlib.stages import quantize as ptq
from ptqlib.study.params import FinetuneParams, QuantizeParams
from ptqlib.study.schema import load_study


def _params(method, **kw):
    return FinetuneParams(**{"method": method, "rank": 4, "alpha": 8.0, "steps": 1, **kw}).__dict__


def _dora_layers(model):
    return {n: m for n, m in model.named_modules() if hasattr(m, "lora_magnitude_vector") and m.lora_magnitude_vector}


def _train_step(model, x):
    model.train()
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    return loss


def test_dora_trains_a_magnitude_and_merges_exactly(tmp_path):
    model, tok, _ = artifacts.load("tiny", "cpu")
    model = finetune.prepare(model, "dora", _params("dora"), "tiny")
    layers = _dora_layers(model)
    assert len(layers) == 7 * model.config.num_hidden_layers
    x = torch.randint(0, 1024, (2, 16))
    assert torch.isfinite(_train_step(model, x))
    m = next(iter(layers.values()))
    assert m.lora_magnitude_vector["default"].weight.grad is not None  # the magnitude trains
    with torch.no_grad():  # a step off the start, so that the merge has something to fold
        for p in model.parameters():
            if p.requires_grad and p.grad is not None:
                p -= 0.05 * p.grad.sign()
    model.eval()
    with torch.no_grad():
        unmerged = model(x).logits
    info = finetune.save(model, tok, "dora", _params("dora", merge=True), tmp_path / "run", "tiny")
    assert info["type"] == "hf"
    merged, _, _ = artifacts.load(tmp_path / "run", "cpu")
    with torch.no_grad():
        assert torch.allclose(merged(x).logits, unmerged, atol=1e-4)


def test_qdora_trains_on_nf4_codes(tmp_path):
    p = QuantizeParams(method="nf4").__dict__
    model, tok, _ = ptq.quantize("tiny", p)
    ptq.save(model, tok, p, tmp_path / "nf4", "tiny")
    model, _, _ = artifacts.load(tmp_path / "nf4", "cpu")
    model = finetune.prepare(model, "qdora", _params("qdora"), str(tmp_path / "nf4"))
    assert _dora_layers(model)
    assert torch.isfinite(_train_step(model, torch.randint(0, 1024, (2, 16))))
    info = finetune.save(model, tok, "qdora", _params("qdora"), tmp_path / "run", str(tmp_path / "nf4"))
    assert info["type"] == "peft" and artifacts.is_quantized(tmp_path / "run")


def test_qdora_reloaded_computes_what_its_merge_does(tmp_path):
    """The saved QDoRA model, loaded and run for inference (twice: bitsandbytes repacks a 4-bit weight
    for its CPU kernel at the first inference forward on AVX512-BF16 CPUs, after which peft's DoRA
    norm read the wrong layout), gives the logits of the same adapter merged into the de-quantized
    weights (a float model, built from a fresh load)."""
    torch.manual_seed(0)
    p = QuantizeParams(method="nf4").__dict__
    model, tok = ptq.quantize("tiny", p)[:2]
    ptq.save(model, tok, p, tmp_path / "nf4", "tiny")
    model = artifacts.load(tmp_path / "nf4", "cpu")[0]
    model = finetune.prepare(model, "qdora", _params("qdora"), str(tmp_path / "nf4"))
    x = torch.randint(0, 1024, (2, 16))
    _train_step(model, x)
    with torch.no_grad():  # a step off the start: B != 0 and the magnitude moved
        for prm in model.parameters():
            if prm.requires_grad and prm.grad is not None:
                prm -= 0.05 * prm.grad.sign()
    finetune.save(model, tok, "qdora", _params("qdora"), tmp_path / "run", str(tmp_path / "nf4"))
    finetune.save(model, tok, "qdora", _params("qdora", merge=True), tmp_path / "merged", str(tmp_path / "nf4"))
    merged = artifacts.load(tmp_path / "merged", "cpu")[0]
    back = artifacts.load(tmp_path / "run", "cpu")[0]
    with torch.no_grad():
        want = merged(x).logits
        for _ in range(2):
            assert torch.allclose(back(x).logits, want, atol=1e-3), (back(x).logits - want).abs().max()


def test_qdora_starts_from_the_stored_weights_norms_after_an_inference_forward(tmp_path):
    """QDoRA prepared on an NF4 model that has already run for inference (bitsandbytes may have
    repacked its weights for the CPU kernel) starts its magnitude at the column norms of the stored
    weight, and computes what the base model did (B = 0)."""
    import bitsandbytes.functional as F

    p = QuantizeParams(method="nf4").__dict__
    model, tok = ptq.quantize("tiny", p)[:2]
    ptq.save(model, tok, p, tmp_path / "nf4", "tiny")
    fresh = artifacts.load(tmp_path / "nf4", "cpu")[0]
    w = fresh.model.layers[0].mlp.down_proj.weight
    want = F.dequantize_4bit(w.data, w.quant_state).float().norm(dim=1)
    model = artifacts.load(tmp_path / "nf4", "cpu")[0]
    x = torch.randint(0, 1024, (2, 16))
    with torch.no_grad():
        base = model(x).logits  # an inference forward first
    model = finetune.prepare(model, "qdora", _params("qdora"), str(tmp_path / "nf4"))
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    assert torch.allclose(layer.lora_magnitude_vector["default"].weight.float(), want, rtol=1e-2)  # peft: bf16 norms
    model.eval()
    with torch.no_grad():
        # bnb's repacked CPU kernel and its stored-layout path round differently (~2e-3 here)
        assert torch.allclose(model(x).logits, base, atol=1e-2)


@pytest.mark.parametrize("chain, error", [
    ("[{quantize: nf4}, {finetune: qdora}]", None),
    ("[{finetune: dora}]", None),
    ("[{quantize: {method: gptq, group_size: 32}}, {finetune: qdora}]", r"needs a bitsandbytes 4-bit input.*"
                                                                        r"not for ptqlib's QuantLinear"),
    ("[{quantize: rtn}, {finetune: dora}]", "needs a float model"),
])
def test_where_dora_goes(tmp_path, chain, error):
    f = tmp_path / "s.yaml"
    f.write_text(f"model: tiny\npipelines:\n  a: {chain}\n")
    if error is None:
        assert load_study(f).pipelines
    else:
        with pytest.raises(ConfigError, match=error):
            load_study(f)

"""A second model family: the methods on ``tiny-gemma3`` (Gemma 3's text architecture: QK-norm, sliding-window
and global layers, a scaled embedding), through the stages' own code, as on the Llama-style ``tiny``."""
import copy

import pytest
import torch

from ptqlib import artifacts
from ptqlib.errors import ConfigError
from ptqlib.stages import finetune
from ptqlib.stages import quantize as ptq
from ptqlib.study.params import FinetuneParams, QuantizeParams

MODEL = "tiny-gemma3"


@pytest.fixture(scope="module")
def float_model():
    model, tok, _ = artifacts.load(MODEL, "cpu")
    assert type(model).__name__ == "Gemma3ForCausalLM" and model.config.layer_types == ["sliding_attention",
                                                                                         "full_attention"]
    return model, tok


def _x():
    return torch.randint(0, 1024, (2, 80), generator=torch.Generator().manual_seed(0))  # past the 64-token window


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The quantize stages' outputs on tiny-gemma3, saved as the runner leaves them."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for method, extra in (("rtn", {}), ("gptq", {"calib_samples": 8, "calib_seq_len": 64}), ("nf4", {})):
        p = QuantizeParams(method=method, bits=4, group_size=32, precision="fp32", calib_seed=0, **extra).__dict__
        model, tok, stats = ptq.quantize(MODEL, p, ptq.calibration_windows(MODEL, p))
        ptq.save(model, tok, p, root / method, MODEL)
        out[method] = (root / method, stats)
    return out


def test_ptq_round_trips_and_gptq_beats_rtn_on_its_calibration_outputs(float_model, runs):
    x = _x()
    with torch.no_grad():
        ref = float_model[0](x).logits
        err = {m: torch.linalg.norm(artifacts.load(d, "cpu")[0](x).logits - ref).item() for m, (d, _) in runs.items()}
    assert all(0 < e < torch.linalg.norm(ref).item() for e in err.values()), err
    stats = runs["gptq"][1]
    assert stats["mean_gptq_rel_err"] < stats["mean_rtn_rel_err"]  # GPTQ's update works on this architecture too


@pytest.mark.parametrize("method, extra", [("fp4", {}), ("hqq", {}), ("awq", {"calib_samples": 4, "calib_seq_len": 64}),
                                           ("autoround", {"calib_samples": 4, "calib_seq_len": 64, "iters": 2,
                                                          "batch_size": 2})])
def test_the_other_ptq_methods_quantize_gemma3_and_round_trip(float_model, method, extra, tmp_path):
    """FP4, HQQ, AWQ and AutoRound on Gemma 3's layout: the saved model loads back to the logits quantized in
    memory, which differ from the float model's by less than they are."""
    p = QuantizeParams(method=method, bits=4, group_size=32, precision="fp32", calib_seed=0, **extra).__dict__
    model, tok, _ = ptq.quantize(MODEL, p, ptq.calibration_windows(MODEL, p))
    ptq.save(model, tok, p, tmp_path / method, MODEL)
    x = _x()
    with torch.no_grad():
        ref, out = float_model[0](x).logits, model(x).logits
        again = artifacts.load(tmp_path / method, "cpu")[0](x).logits
    assert torch.allclose(again, out, atol=1e-4)
    assert 0 < torch.linalg.norm(out - ref) < torch.linalg.norm(ref)


@pytest.mark.parametrize("method, base", [("qlora", "gptq"), ("qlora", "nf4"), ("loftq", "nf4"), ("eora", "rtn"),
                                          ("qblora", "gptq"), ("qdora", "nf4"), ("qalora", "gptq"), ("cloq", "gptq")])
def test_adapters_on_a_quantized_gemma3_train_and_round_trip(runs, method, base, tmp_path):
    d = runs[base][0]
    extra = {"eora_samples": 4, "eora_seq_len": 64} if method in ("eora", "cloq") else {}
    extra.update({"group_size": 32} if method == "qalora" else {})
    p = FinetuneParams(method=method, rank=4, alpha=8.0, steps=0, **extra).__dict__
    model = finetune.prepare(artifacts.load(d, "cpu")[0], method, p, str(d), seed=0)
    trainable, _ = finetune.count_trainable(model)
    assert trainable > 0
    x = _x()
    with torch.no_grad():
        out = model(x).logits
    tok = artifacts.load(MODEL, "cpu")[1]
    info = finetune.save(model, tok, method, p, tmp_path / "run", str(d))
    from ptqlib.files import write_json_atomic

    artifacts.save(tmp_path / "run", info, str(d))
    write_json_atomic(tmp_path / "run" / "metrics.json", {"status": "ok", "input": str(d)})
    with torch.no_grad():
        again = artifacts.load(tmp_path / "run", "cpu")[0](x).logits
    assert torch.allclose(again, out, atol=1e-4)


def test_qablora_merges_exactly_into_the_gptq_grid(runs):
    from ptqlib.adapters.blora import merge_adapters

    d = runs["gptq"][0]
    p = FinetuneParams(method="qablora", rank=4, alpha=8.0, steps=0, group_size=32).__dict__
    model = finetune.prepare(artifacts.load(d, "cpu")[0], "qablora", p, str(d), seed=0)
    with torch.no_grad():
        for n, prm in model.named_parameters():
            if prm.requires_grad:
                prm.normal_(0, 0.05)  # a trained adapter, not its zero start
        x = _x()
        before = model(x).logits
        merged = merge_adapters(model)
        after = merged(x).logits
    assert torch.allclose(before, after, atol=1e-4)


def test_the_float_input_methods_prepare_on_the_float_gemma3(float_model):
    for method, extra in (("full", {}), ("lora", {}), ("dora", {}), ("pissa", {}), ("qpissa", {}),
                          ("l4q", {"bits": 4, "group_size": 32}), ("qat_lora", {"bits": 4, "group_size": 32})):
        p = FinetuneParams(method=method, rank=4, alpha=8.0, steps=0, **extra).__dict__
        model = finetune.prepare(copy.deepcopy(float_model[0]), method, p, MODEL, seed=0)
        assert finetune.count_trainable(model)[0] > 0
        with torch.no_grad():
            assert model(_x()).logits.shape == (2, 80, 1024)


def test_a_llama_cpp_evaluation_of_a_gemma3_llama_cpp_cannot_run_is_refused_before_any_stage(tmp_path):
    """tiny-gemma3 alternates sliding and global layers; llama.cpp fixes Gemma 3 at five sliding to one global."""
    from ptqlib.study.schema import load_study

    f = tmp_path / "s.yaml"
    f.write_text(f"model: {MODEL}\npipelines:\n  a: [{{quantize: rtn}}, {{evaluate: {{runtime: llama.cpp}}}}]\n")
    with pytest.raises(ConfigError, match=r"runtime: 'llama.cpp' runs a GGUF export.*every 6th layer global"):
        load_study(f)
    f.write_text(f"model: {MODEL}\npipelines:\n  a: [{{quantize: {{method: gptq, group_size: 48}}}}]\n")
    with pytest.raises(ConfigError, match=r"group_size: 48 does not divide"):
        load_study(f)


def test_generation_past_the_sliding_window_is_transformers_own_and_scores(float_model):
    """ptqlib's batched generation (its in-place KV cache keeps Gemma 3's sliding-window layers as transformers
    makes them) gives the tokens transformers' own cache gives, on prompts longer than the 64-token window;
    evaluate_model scores the task and perplexity on it."""
    from ptqlib.data import format_prompt, load_task
    from ptqlib.stages.evaluate import evaluate_model, generate

    model, tok = float_model
    ex = load_task("meetings", "test", 3)
    texts, n_tok, _ = generate(model, tok, [e.prompt for e in ex], max_new_tokens=12, batch_size=3)
    tok.padding_side = "left"
    enc = tok([format_prompt(tok, e.prompt) for e in ex], return_tensors="pt", padding=True, add_special_tokens=False)
    tok.padding_side = "right"
    assert enc["input_ids"].shape[1] > 64
    with torch.no_grad():
        plain = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id,
                               eos_token_id=tok.eos_token_id)
    new = plain[:, enc["input_ids"].shape[1]:]
    want = [tok.decode(r[: (r.tolist().index(tok.eos_token_id) + 1) if tok.eos_token_id in r.tolist() else len(r)],
                       skip_special_tokens=True).strip() for r in new]
    assert texts == want
    metrics, rows, units = evaluate_model(model, tok, ex, ppl_samples=2, ppl_seq_len=96, max_new_tokens=8,
                                          batch_size=3, reference=model)
    assert 1 < metrics["ppl"] < 1e4 and metrics["kl"] == pytest.approx(0, abs=1e-6) and len(rows) == 3

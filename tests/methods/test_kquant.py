"""``method: kquant``: llama.cpp's K-quants as a quantize stage. Its artifact is llama.cpp's file, loaded into
torch exactly, scored in llama.cpp as it is, and QLoRA trains on it; bad settings are refused at load."""
import os

import pytest
import torch

from ptqlib import artifacts
from ptqlib.deploy import llamacpp
from ptqlib.errors import ConfigError
from ptqlib.methods.kquant import kquant_type
from ptqlib.stages import quantize as ptq
from ptqlib.study.params import QuantizeParams
from ptqlib.study.schema import load_study


@pytest.mark.parametrize("bits, mix, want", [(4, "M", "Q4_K_M"), (3, "L", "Q3_K_L"), (5, "S", "Q5_K_S"),
                                             (2, "M", "Q2_K"), (6, "S", "Q6_K")])
def test_bits_and_mix_name_llama_cpps_types(bits, mix, want):
    assert kquant_type(bits, mix) == want


def test_the_methods_listing_names_every_llama_cpp_type_with_the_settings_that_select_it():
    """`python -m ptqlib methods` lists each K-quant type with its bits and mix, and each pair selects that type."""
    import re

    from ptqlib.cli import methods_table
    from ptqlib.deploy.kquants import KQUANT_TYPES

    line = next(x for x in methods_table().splitlines() if "formats:" in x and "Q4_K_M" in x)
    listed = re.findall(r"(Q\d_K(?:_[SML])?) \(bits (\d)(?:, mix ([SML]))?\)", line)
    assert {t for t, _, _ in listed} == set(KQUANT_TYPES)
    for t, bits, mix in listed:
        assert kquant_type(int(bits), mix or "M") == t


@pytest.mark.parametrize("stage, error", [
    ("{method: kquant, bits: 4, mix: L}", r"bits 4 with mix 'L' is no llama.cpp K-quant; valid: .*Q4_K_M"),
    ("{method: kquant, mix: X}", r"mix: 'X'; valid: S, M, L"),
    ("{method: kquant, bits: 8}", r"bits: 8 is not supported by method 'kquant'; valid: 2, 3, 4, 5, 6"),
    ("{method: rtn, mix: S}", r"mix: 'S' has no effect on method 'rtn'; it applies to kquant only"),
    ("{method: kquant, imatrix: 1}", r"imatrix: 1 has type int; expected bool"),
    ("{method: gptq, imatrix: true}", r"imatrix: True has no effect on method 'gptq'; it applies to kquant only"),
])
def test_bad_settings_are_refused_before_anything_runs(tmp_path, stage, error):
    f = tmp_path / "s.yaml"
    f.write_text(f"model: tiny\npipelines:\n  a: [{{quantize: {stage}}}]\n")
    with pytest.raises(ConfigError, match=error):
        load_study(f)


def test_qlora_takes_a_kquant_input_and_a_grid_method_does_not(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("model: tiny\npipelines:\n  a: [{quantize: {method: kquant, bits: 3}}, {finetune: qlora}]\n")
    assert load_study(f).pipelines
    f.write_text("model: tiny\npipelines:\n  a: [{quantize: {method: kquant}}, {finetune: eora}]\n")
    with pytest.raises(ConfigError, match="needs a uniform grid"):
        load_study(f)


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory):
    """The tiny Llama at hidden 256 / MLP 512 (K-quant input sizes), saved as a model directory."""
    from transformers import LlamaForCausalLM

    from ptqlib.models import load_tokenizer, resolve_model
    from ptqlib.tiny import tiny_config

    cfg = tiny_config()
    cfg.hidden_size, cfg.intermediate_size, cfg.head_dim = 256, 512, 64
    g = torch.Generator().manual_seed(1)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    out = tmp_path_factory.mktemp("wide")
    model.save_pretrained(out)
    load_tokenizer(resolve_model("tiny")).save_pretrained(out)
    return str(out)


def _llamacpp_or_skip():
    if not llamacpp.available():
        if os.environ.get("PTQLIB_REQUIRE_LLAMACPP") == "1":
            raise RuntimeError("PTQLIB_REQUIRE_LLAMACPP=1 but llama-cpp-python is not installed")
        pytest.skip("llama-cpp-python is not installed")


def test_the_stage_saves_llama_cpps_file_and_loads_it_back_exactly(wide_dir, tmp_path):
    _llamacpp_or_skip()
    from ptqlib.deploy.gguf import read_tensors

    p = QuantizeParams(method="kquant", bits=4).__dict__
    model, tok, stats = ptq.quantize(wide_dir, p)
    assert stats["type"] == "Q4_K_M" and stats["tensor_types"]["Q4_K"] > 0
    float_model, _, _ = artifacts.load(wide_dir, "cpu")
    werr = ptq.weight_error(float_model, model)
    assert len(werr) == 14 and all(0.01 < e < 0.15 for e in werr.values())  # 2 layers x 7 linears, 4-6 bits
    info = ptq.save(model, tok, p, tmp_path / "kq", wide_dir)
    assert info["kquant"] == "Q4_K_M" and artifacts.is_quantized(tmp_path / "kq")
    own = artifacts.own_gguf(tmp_path / "kq")
    assert own == tmp_path / "kq" / "model.gguf"
    loaded, _, _ = artifacts.load(tmp_path / "kq", "cpu")
    for (name, a), b in zip(model.named_parameters(), loaded.parameters()):
        assert torch.equal(a, b), name
    stored = read_tensors(own, ["blk.1.ffn_gate.weight"])["blk.1.ffn_gate.weight"]
    assert torch.equal(loaded.model.layers[1].mlp.gate_proj.weight, stored)
    sizes = artifacts.size_metrics(loaded, tmp_path / "kq")
    assert sizes["size_mb_deploy"] == own.stat().st_size / 2**20  # the file, not the float model
    assert sizes["size_mb_stored"] == own.stat().st_size / 2**20  # the only weight file of the stage


def test_the_loaded_stage_keeps_the_generation_config_a_trained_config_would_lose(wide_dir, tmp_path):
    """A fine-tuned model's config.json says ``use_cache: false`` (training turns the cache off); a stage loaded
    from its config alone would then generate without a KV cache (a validation evaluate of 11 min instead of
    100 s). The stage saves the model's generation config and the load restores it."""
    _llamacpp_or_skip()
    p = QuantizeParams(method="kquant", bits=4).__dict__
    model, tok, _ = ptq.quantize(wide_dir, p)
    model.config.use_cache = False  # as the Trainer leaves it
    model.generation_config.eos_token_id = 7
    ptq.save(model, tok, p, tmp_path / "kq", wide_dir)
    loaded, _, _ = artifacts.load(tmp_path / "kq", "cpu")
    assert loaded.config.use_cache is False
    assert loaded.generation_config.use_cache is True and loaded.generation_config.eos_token_id == 7


def test_qlora_trains_on_the_kquant_weights_and_leaves_them_frozen(wide_dir, tmp_path):
    _llamacpp_or_skip()
    from ptqlib.data import load_task, sft_features
    from ptqlib.stages import finetune
    from ptqlib.study.params import FinetuneParams

    p = QuantizeParams(method="kquant", bits=3).__dict__
    model, tok, _ = ptq.quantize(wide_dir, p)
    ptq.save(model, tok, p, tmp_path / "kq", wide_dir)
    base, tok, _ = artifacts.load(tmp_path / "kq", "cpu")
    before = base.model.layers[0].mlp.up_proj.weight.detach().clone()
    fp = FinetuneParams(method="qlora", steps=2, batch_size=2, train_samples=4, max_length=64, lr=1e-2,
                        precision="fp32")
    trained = finetune.prepare(base, "qlora", fp, str(tmp_path / "kq"), seed=0)
    features = sft_features(tok, load_task("meetings", "train", 4), 64)
    finetune.train(trained, tok, features, fp, seed=0)
    up = trained.base_model.model.model.layers[0].mlp.up_proj
    assert torch.equal(up.base_layer.weight, before)  # the K-quant grid stays as llama.cpp wrote it
    assert up.lora_B["default"].weight.abs().sum() > 0  # the adapter learned
    # what deploys is llama.cpp's file and the adapter at 16 bits, not the de-quantized base torch holds
    finetune.save(trained, tok, "qlora", fp, tmp_path / "ql", str(tmp_path / "kq"))
    loaded, _, _ = artifacts.load(tmp_path / "ql", "cpu")
    adapter = sum(p.numel() for n, p in loaded.named_parameters() if "lora_" in n)
    want = (tmp_path / "kq" / "model.gguf").stat().st_size + 2 * adapter
    assert artifacts.size_metrics(loaded, tmp_path / "ql")["size_mb_deploy"] == want / 2**20
    assert artifacts.size_metrics(base, tmp_path / "kq")["size_mb_deploy"] < want / 2**20 < \
        artifacts.tensor_bytes(base, float_bytes=2) / 2**20


def test_llama_cpp_scores_the_stages_own_file_as_it_is(wide_dir, tmp_path):
    """runtime llama.cpp at gguf_type auto exports nothing: it scores llama.cpp's file, whose size it reports;
    its perplexity is the torch model's within llama.cpp's activation rounding."""
    _llamacpp_or_skip()
    from ptqlib.data import load_task
    from ptqlib.stages import evaluate
    from ptqlib.study.params import EvaluateParams

    p = QuantizeParams(method="kquant", bits=4).__dict__
    model, tok, _ = ptq.quantize(wide_dir, p)
    ptq.save(model, tok, p, tmp_path / "kq", wide_dir)
    examples = load_task("meetings", "test", 2)
    shared = dict(ppl_samples=2, ppl_seq_len=32, ppl_sources=["pydoc"], task_samples=2, max_new_tokens=4,
                  kl_reference=False, precision="fp32")
    ev = EvaluateParams(runtime="llama.cpp", **shared)
    loaded, tok, _ = artifacts.load(tmp_path / "kq", "cpu")
    metrics, _, _ = evaluate.run_stage(loaded, tok, str(tmp_path / "kq"), examples, ev, tmp_path / "ev")
    assert not (tmp_path / "ev" / "model.gguf").exists()
    assert metrics["size_mb_gguf"] == (tmp_path / "kq" / "model.gguf").stat().st_size / 2**20
    mine, _, _ = evaluate.run_stage(loaded, tok, str(tmp_path / "kq"), examples, EvaluateParams(**shared),
                                    tmp_path / "ev2")
    assert abs(metrics["ppl"] / mine["ppl"] - 1) < 0.02, (metrics["ppl"], mine["ppl"])


def test_a_model_ptqlib_writes_no_gguf_for_is_refused_at_load(tmp_path):
    """tiny-gemma3 alternates its two layers, a pattern llama.cpp's Gemma 3 graph cannot run: the refusal is the
    export's reason, before any stage (a Gemma 3 of llama.cpp's pattern is quantized in test_gguf_gemma3.py)."""
    f = tmp_path / "s.yaml"
    f.write_text("model: tiny-gemma3\npipelines:\n  a: [{quantize: {method: kquant}}]\n")
    with pytest.raises(ConfigError, match="'kquant' quantizes a GGUF export, which ptqlib cannot write for model "
                                          "'tiny-gemma3': llama.cpp's Gemma 3 graph makes every 6th layer global"):
        load_study(f)


def test_export_of_a_kquant_stage_writes_llama_cpps_file_as_it_is(wide_dir, tmp_path, capsys):
    """`python -m ptqlib export runs/<kquant stage>` at type auto gives the stage's own Q4_K_M file (its codes as
    llama.cpp made them), not an F16 export of the de-quantized weights torch holds; --type f16 still exports."""
    _llamacpp_or_skip()
    import json

    from ptqlib.cli import main

    p = QuantizeParams(method="kquant", bits=4).__dict__
    model, tok, _ = ptq.quantize(wide_dir, p)
    ptq.save(model, tok, p, tmp_path / "kq", wide_dir)
    assert main(["export", str(tmp_path / "kq"), "-o", str(tmp_path / "out" / "m.gguf")]) == 0
    assert (tmp_path / "out" / "m.gguf").read_bytes() == (tmp_path / "kq" / "model.gguf").read_bytes()
    summary = json.loads(capsys.readouterr().out)
    assert summary["file_type"] == "as stored" and summary["tensor_types"].get("Q4_K", 0) > 0
    assert main(["export", str(tmp_path / "kq"), "--type", "f16", "-o", str(tmp_path / "f16.gguf")]) == 0
    assert json.loads(capsys.readouterr().out)["tensor_types"].get("F16", 0) > 0
    assert list((tmp_path / "out").iterdir()) == [tmp_path / "out" / "m.gguf"]  # no temp file left


def test_an_importance_matrix_makes_the_stage_calibrate_on_each_seeds_windows(tmp_path, wide_dir):
    """imatrix: true reads calibration windows drawn by the pipeline's seed (each seed its own draw, the
    calibration's size and precision in its id); without it the stage reads none and runs once for all seeds."""
    f = tmp_path / "s.yaml"
    f.write_text("model: tiny\nseeds: [0, 1]\npipelines:\n  plain: [{quantize: {method: kquant}}]\n"
                 "  im: [{quantize: {method: kquant, imatrix: true, calib_samples: 4, calib_seq_len: 32}}]\n")
    stages = {pl.name: pl.stages[0].params for pl in load_study(f).pipelines}
    assert [stages[f"im[seed={s}]"]["calib_seed"] for s in (0, 1)] == [0, 1]
    assert stages["plain"]["calib_seed"] == 0 and "plain[seed=1]" not in stages  # nothing drawn: one run
    _llamacpp_or_skip()
    p = QuantizeParams(method="kquant", bits=4, imatrix=True, calib_samples=4, calib_seq_len=32, calib_seed=0,
                       precision="fp32").__dict__
    with pytest.raises(ConfigError, match="imatrix: true needs calibration windows"):
        ptq.quantize(wide_dir, p)  # before any work
    calib = ptq.calibration_windows(wide_dir, p)
    assert calib.shape == (4, 32) and ptq.calibration_windows(wide_dir, {**p, "imatrix": False}) is None
    model, _, stats = ptq.quantize(wide_dir, p, calib)
    plain, _, _ = ptq.quantize(wide_dir, {**p, "imatrix": False})
    assert stats["imatrix_tensors"] == 14 and stats["precision"] == "fp32"  # 2 layers x 7 linears
    up, up0 = model.model.layers[0].mlp.up_proj.weight, plain.model.layers[0].mlp.up_proj.weight
    assert not torch.equal(up, up0)  # the windows changed llama.cpp's rounding


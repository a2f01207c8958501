"""An exported tiny model runs in llama.cpp with ptqlib's logits, greedy tokens and tokenization.

llama.cpp is an optional extra (``pip install -e '.[llamacpp]'``, installed by ``make install``);
without it these tests skip, except where ``PTQLIB_REQUIRE_LLAMACPP=1`` (CI) makes them fail.

Tolerance: llama.cpp's CPU kernels multiply Q4_1 / Q8_0 weights with activations quantized
to 8 bits per block of 32 (Q8_1 / Q8_0), and F16 weights with F16 activations, so its logits
differ from ptqlib's float forward by that rounding, not by the weights (which are exact, see
test_gguf.py). The bound below is relative to the spread of the logits.
"""
import os

import numpy as np
import pytest
import torch

from ptqlib.deploy import llamacpp
from ptqlib.deploy.gguf import export_gguf
from ptqlib.quant import rtn_quantize_model

if not llamacpp.available():
    if os.environ.get("PTQLIB_REQUIRE_LLAMACPP") == "1":
        raise RuntimeError("PTQLIB_REQUIRE_LLAMACPP=1 but llama-cpp-python is not installed")
    pytest.skip("llama-cpp-python is not installed (pip install -e '.[llamacpp]')", allow_module_level=True)


@pytest.fixture(scope="module")
def tiny_tok():
    from ptqlib.models import load_tokenizer, resolve_model

    return load_tokenizer(resolve_model("tiny"))


@pytest.fixture(scope="module")
def sharp_tiny():
    """The tiny model with its embeddings scaled up so greedy decisions are not near-ties
    (a random model's logits are almost flat, and any rounding would flip its argmax)."""
    from ptqlib.tiny import build_tiny_model

    m = build_tiny_model(seed=0)
    with torch.no_grad():
        m.model.embed_tokens.weight.mul_(40)
    return m


def _text_ids(tok, n=48):
    from ptqlib.text import pydoc_split

    _, test = pydoc_split()
    text = next(iter(test.values()))[:4000]
    return tok(text, add_special_tokens=False)["input_ids"][:n]


@pytest.mark.parametrize("kind", ["q4_1", "f16"])
def test_logits_match_ptqlib_forward(sharp_tiny, tiny_tok, tmp_path, kind):
    import copy

    model = copy.deepcopy(sharp_tiny)
    if kind == "q4_1":
        rtn_quantize_model(model, bits=4, group_size=32)
    export_gguf(model, tiny_tok, tmp_path / "m.gguf")
    ids = _text_ids(tiny_tok)
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    with llamacpp.LlamaCppModel(tmp_path / "m.gguf", n_ctx=128, n_threads=1, logits_all=True) as lm:
        got = lm.logits(ids)
    err = np.abs(got - want).max() / want.std()
    assert err < (0.05 if kind == "q4_1" else 0.01), err
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.95


def test_extra_buffers_are_applied_and_keep_the_logits(sharp_tiny, tiny_tok, tmp_path):
    """Repacked weights or not, llama.cpp computes the same logits (f16, which no AMX kernel takes);
    the setting reaches llama.cpp, the library default is restored, and the default is off
    exactly on an AMX CPU (where llama-cpp-python 0.3.36 crashes on Q4_1)."""
    import llama_cpp.llama_cpp as C

    export_gguf(sharp_tiny, tiny_tok, tmp_path / "m.gguf")
    ids = _text_ids(tiny_tok)
    got = {}
    for extra in (False, True):
        with llamacpp.LlamaCppModel(tmp_path / "m.gguf", n_ctx=128, n_threads=1, logits_all=True,
                                    extra_buffers=extra) as lm:
            assert lm.llm.model_params.use_extra_bufts is extra
            got[extra] = lm.logits(ids)
    np.testing.assert_allclose(got[True], got[False], rtol=1e-3, atol=1e-3 * float(np.abs(got[False]).max()))
    assert C.llama_model_default_params().use_extra_bufts is True
    assert llamacpp.default_extra_buffers() is (not llamacpp.cpu_has_amx())


def test_greedy_tokens_and_tokenization_match(sharp_tiny, tiny_tok, tmp_path):
    import copy

    model = copy.deepcopy(sharp_tiny)
    rtn_quantize_model(model, bits=4, group_size=64)
    export_gguf(model, tiny_tok, tmp_path / "m.gguf")
    lm = llamacpp.LlamaCppModel(tmp_path / "m.gguf", n_ctx=256, n_threads=1)
    for text in ["def parse(self, text):\n    return", "The with statement", "Meeting notes: moved to"]:
        ids = tiny_tok(text, add_special_tokens=False)["input_ids"]
        assert lm.llm.tokenize(text.encode(), add_bos=False) == ids  # the file's tokenizer is the model's
        with torch.no_grad():
            ref = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                                 pad_token_id=tiny_tok.pad_token_id)[0, len(ids):].tolist()
        got, ttft, _ = lm.generate(ids, 12, eos_id=None)
        assert got == ref[: len(got)] and len(got) == 12 and ttft > 0
    lm.close()


def test_evaluate_gguf_scores_the_same_units(tiny_tok, tmp_path):
    """The runtime's perplexity is the torch perplexity of the same weights (within kernel rounding);
    every unit group and speed figure is there."""
    from ptqlib.data import load_task
    from ptqlib.stages.evaluate import evaluate_gguf, evaluate_model
    from ptqlib.tiny import build_tiny_model

    model = build_tiny_model(seed=0)
    rtn_quantize_model(model, bits=4, group_size=32)
    export_gguf(model, tiny_tok, tmp_path / "m.gguf")
    ex = load_task("meetings", "test", 3)
    m_t, _, u_t = evaluate_model(model, tiny_tok, ex, ppl_samples=4, ppl_seq_len=64, max_new_tokens=8,
                                 ppl_sources=("pydoc", "stdlib"))
    m_g, rows, u_g = evaluate_gguf(tmp_path / "m.gguf", tiny_tok, ex, ppl_samples=4, ppl_seq_len=64,
                                   max_new_tokens=8, ppl_sources=("pydoc", "stdlib"), speed_prompts=2, speed_tokens=8,
                                   n_threads=1)
    assert set(u_g) == set(u_t) == {"ppl", "ppl_stdlib", "task"}
    assert len(u_g["task"]["field_f1"]) == 3 and len(rows) == 3
    for k in ("ppl", "ppl_stdlib"):
        assert u_g[k]["tokens"] == u_t[k]["tokens"]
        assert abs(m_g[k] / m_t[k] - 1) < 0.01, (k, m_g[k], m_t[k])
    assert m_g["decode_tokens_per_s"] > 0 and m_g["ttft_s"] > 0 and m_g["peak_rss_mb"] > 10
    assert m_g["llamacpp_extra_buffers"] == float(llamacpp.default_extra_buffers())


def test_evaluate_gguf_measures_closeness_to_a_reference_as_torch_does(tiny_tok, tmp_path):
    """llama.cpp's KL, top-1 agreement and Delta-p against the float model: near 0 / 1 / 0 for the float model's
    own F16 export, and for an RTN 4-bit export within llama.cpp's kernel rounding of torch's figures for the same
    weights; every position's KL gives the quantiles."""
    import copy

    from ptqlib.stages.evaluate import evaluate_gguf, evaluate_model
    from ptqlib.tiny import build_tiny_model

    model = build_tiny_model(seed=0)
    q = copy.deepcopy(model)
    rtn_quantize_model(q, bits=4, group_size=32)
    export_gguf(model, tiny_tok, tmp_path / "f16.gguf")
    export_gguf(q, tiny_tok, tmp_path / "q4.gguf")
    kw = dict(ppl_samples=4, ppl_seq_len=64, max_new_tokens=2, speed_prompts=0, n_threads=1)
    same, _, u = evaluate_gguf(tmp_path / "f16.gguf", tiny_tok, [], reference="tiny", **kw)
    assert same["kl"] < 1e-3 and same["top1_agree"] > 0.95 and abs(same["delta_p"]) < 1e-3
    assert set(u["ppl"]) >= {"nll", "tokens", "kl", "top1", "dp", "doc"}
    m_g, _, _ = evaluate_gguf(tmp_path / "q4.gguf", tiny_tok, [], reference="tiny", **kw)
    m_t, _, _ = evaluate_model(q, tiny_tok, [], ppl_samples=4, ppl_seq_len=64, reference=model)
    assert m_g["kl"] > 10 * same["kl"] and abs(m_g["kl"] / m_t["kl"] - 1) < 0.05, (m_g["kl"], m_t["kl"])
    assert abs(m_g["top1_agree"] - m_t["top1_agree"]) < 0.05
    assert m_g["kl_p50"] <= m_g["kl_p90"] <= m_g["kl_p99"] <= m_g["kl_max"]
    plain, _, _ = evaluate_gguf(tmp_path / "q4.gguf", tiny_tok, [], **kw)
    assert "kl" not in plain and plain["ppl"] == m_g["ppl"]  # the NLL is the same with or without the reference

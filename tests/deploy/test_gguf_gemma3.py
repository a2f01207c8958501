"""Gemma 3 to GGUF: a tiny Gemma 3 of llama.cpp's layer pattern (five sliding-window layers, one global) runs in
llama.cpp with ptqlib's logits past the sliding window, float and with exact Q4_1 codes; a pattern llama.cpp
cannot run is refused with the reason. Tolerances as in test_llamacpp.py (llama.cpp's activation rounding)."""
import copy
import os

import numpy as np
import pytest
import torch

from ptqlib.deploy import llamacpp
from ptqlib.deploy.gguf import export_gguf, read_tensors
from ptqlib.deploy.kquants import gguf_names, load_weights, quantize_file
from ptqlib.deploy.types import ExportError
from ptqlib.quant import rtn_quantize_model

if not llamacpp.available():
    if os.environ.get("PTQLIB_REQUIRE_LLAMACPP") == "1":
        raise RuntimeError("PTQLIB_REQUIRE_LLAMACPP=1 but llama-cpp-python is not installed")
    pytest.skip("llama-cpp-python is not installed (pip install -e '.[llamacpp]')", allow_module_level=True)


@pytest.fixture(scope="module")
def tok():
    from ptqlib.models import load_tokenizer, resolve_model

    return load_tokenizer(resolve_model("tiny-gemma3"))


def _gemma3(layers: int = 6):
    """tiny-gemma3's sizes with ``layers`` layers in llama.cpp's pattern, its embeddings scaled up so greedy
    decisions are not near-ties (a random model's logits are almost flat)."""
    from transformers import Gemma3ForCausalLM

    from ptqlib.tiny import tiny_gemma3_config

    cfg = tiny_gemma3_config()
    cfg.num_hidden_layers = layers
    cfg.layer_types = ["full_attention" if i % 6 == 5 else "sliding_attention" for i in range(layers)]
    torch.manual_seed(0)
    m = Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():
        m.model.embed_tokens.weight.mul_(8)
        for name, p in m.named_parameters():  # Gemma's norms start at w = 0 (scale 1): give them a shape
            if name.endswith("norm.weight"):
                p.uniform_(-0.5, 0.5)
    return m


def _ids(tok, n=96):  # longer than the 64-token sliding window
    from ptqlib.text import pydoc_split

    text = " ".join(list(pydoc_split()[1].values())[:2])
    return tok(text, add_special_tokens=False)["input_ids"][:n]


@pytest.mark.parametrize("kind", ["f16", "q4_1"])
def test_llama_cpp_computes_ptqlibs_gemma3_past_the_sliding_window(tok, tmp_path, kind):
    model = _gemma3()
    if kind == "q4_1":
        rtn_quantize_model(model, bits=4, group_size=32)
    report = export_gguf(model, tok, tmp_path / "m.gguf")
    assert report.summary()["max_rel_err_exact"] < 1e-2
    norm = model.model.layers[0].self_attn.q_norm.weight.float()
    stored = read_tensors(tmp_path / "m.gguf", ["blk.0.attn_q_norm.weight"])["blk.0.attn_q_norm.weight"]
    assert torch.allclose(stored.reshape(-1), 1 + norm)  # llama.cpp's Gemma norm scales by the stored w
    ids = _ids(tok)
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    with llamacpp.LlamaCppModel(tmp_path / "m.gguf", n_ctx=128, n_threads=1, logits_all=True) as lm:
        got = lm.logits(ids)
    err = np.abs(got - want) / want.std()
    late = err[70:]  # positions the sliding window has cut
    if kind == "f16":
        assert err.max() < 0.01 and late.max() < 0.01, err.max()
    else:  # llama.cpp multiplies Q4_1 by activations rounded to 8 bits per 32 (Q8_1), through six sandwich-normed
        # layers: 0.094 at most, 0.012 on average here; the same weights as F16 match to 0.006, so it is the kernel
        assert err.max() < 0.15 and err.mean() < 0.02 and late.mean() < 0.02, (err.max(), err.mean())
        export_gguf(model, tok, tmp_path / "f16.gguf", type="f16")
        with llamacpp.LlamaCppModel(tmp_path / "f16.gguf", n_ctx=128, n_threads=1, logits_all=True) as lm:
            assert np.abs(lm.logits(ids) - want).max() / want.std() < 0.01
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.95


def test_a_layer_pattern_llama_cpp_cannot_run_is_refused_with_its_reason(tok, tmp_path):
    from ptqlib.tiny import build_tiny_model

    with pytest.raises(ExportError, match=r"every 6th layer global and the others sliding; this model's "
                                          r"layer_types are \['sliding_attention', 'full_attention'\]"):
        export_gguf(build_tiny_model(arch="gemma3"), tok, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.slow
def test_the_real_gemma3_270m_runs_in_llama_cpp_with_ptqlibs_logits(tmp_path):
    """Gemma 3 270M (its 262k-piece SentencePiece vocabulary written as llama.cpp's llama model) exported as F16:
    llama.cpp's next-token choice is torch's at every position of a held-out window (~40 s, 518 MB file)."""
    from ptqlib.models import load_model
    from ptqlib.text import text_windows, with_bos

    model, tok = load_model("gemma3-270m")
    report = export_gguf(model, tok, tmp_path / "m.gguf", type="f16")
    assert report.summary()["tensor_types"]["F16"] == 1 + 18 * 7  # the embedding (tied output) and every linear
    ids = with_bos(tok, text_windows(tok, "test", 64, 1))[0].tolist()
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].float().numpy()
    with llamacpp.LlamaCppModel(tmp_path / "m.gguf", n_ctx=128, n_threads=2, logits_all=True) as lm:
        got = lm.logits(ids)
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.95
    assert np.abs(got - want).max() / want.std() < 0.02


def test_a_kquant_file_of_gemma3_reads_back_as_llama_cpp_computes_it(tok, tmp_path):
    """K-quants on Gemma 3: the F16 export reads back into a fresh model as the fp16 weights bit for bit, and its
    norms as the same float32 scale 1 + w (the file's, shifted back); from llama.cpp's Q4_K_M of it, torch's
    logits are llama.cpp's up to its activation rounding, far closer than the 4-bit weights are to the float
    ones."""
    model = _gemma3_wide()
    export_gguf(model, tok, tmp_path / "f16.gguf", type="f16")
    fresh = copy.deepcopy(model)
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    load_weights(fresh, tmp_path / "f16.gguf")
    names = gguf_names(model)
    assert names["model.layers.0.self_attn.q_norm.weight"][1:] == (None, 1.0)  # no rotary reorder, norm shifted
    for (name, p), q in zip(model.named_parameters(), fresh.parameters()):
        if p.dim() == 2:
            assert torch.equal(q, p.detach().half().float()), name
        else:  # a norm: the scale Gemma computes with, 1 + w in float32, is the file's (w itself loses low bits)
            assert torch.equal(1.0 + q, 1.0 + p.detach()) and (q - p).abs().max() < 1e-7, name

    quantize_file(tmp_path / "f16.gguf", tmp_path / "q4km.gguf", "Q4_K_M")
    kq = copy.deepcopy(model)
    types = load_weights(kq, tmp_path / "q4km.gguf")
    assert types["blk.0.ffn_up.weight"] in ("Q4_K", "Q6_K") and types["blk.0.attn_norm.weight"] == "F32"
    ids = _ids(tok)
    with torch.no_grad():
        mine = kq(torch.tensor([ids])).logits[0].numpy()
        floaty = model(torch.tensor([ids])).logits[0].numpy()
    with llamacpp.LlamaCppModel(tmp_path / "q4km.gguf", n_ctx=128, n_threads=1, logits_all=True) as lm:
        theirs = lm.logits(ids)
    assert (mine.argmax(1) == theirs.argmax(1)).mean() >= 0.9
    assert np.abs(mine - theirs).max() < 0.5 * np.abs(mine - floaty).max(), (np.abs(mine - theirs).max(),
                                                                          np.abs(mine - floaty).max())


@torch.no_grad()
def _gemma3_wide():
    """:func:`_gemma3` at hidden 256, MLP 512: K-quants need input sizes that are multiples of 256 (tiny's 128
    would put every layer in llama.cpp's fallback type); sharp logits, shaped norms."""
    cfg = copy.deepcopy(_gemma3().config)
    cfg.hidden_size, cfg.intermediate_size, cfg.head_dim, cfg.query_pre_attn_scalar = 256, 512, 64, 64
    from transformers import Gemma3ForCausalLM

    m = Gemma3ForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(0)
    for name, p in m.named_parameters():
        if name.endswith("norm.weight"):
            p.uniform_(-0.5, 0.5, generator=g)
        elif p.dim() == 2:
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    m.model.embed_tokens.weight.mul_(20)
    return m

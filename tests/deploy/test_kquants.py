"""llama.cpp's K-quants: made by llama.cpp's quantizer, read back into torch exactly, and the torch model scores
as llama.cpp does. Needs llama-cpp-python (skipped without it, failed under ``PTQLIB_REQUIRE_LLAMACPP=1``)."""
import copy
import os

import numpy as np
import pytest
import torch

from ptqlib.deploy import llamacpp
from ptqlib.deploy.gguf import export_gguf, read_tensors
from ptqlib.deploy.kquants import KQUANT_TYPES, file_report, gguf_names, importance, load_weights, quantize_file
from ptqlib.deploy.types import ExportError

if not llamacpp.available():
    if os.environ.get("PTQLIB_REQUIRE_LLAMACPP") == "1":
        raise RuntimeError("PTQLIB_REQUIRE_LLAMACPP=1 but llama-cpp-python is not installed")
    pytest.skip("llama-cpp-python is not installed (pip install -e '.[llamacpp]')", allow_module_level=True)


@pytest.fixture(scope="module")
def tok():
    from ptqlib.models import load_tokenizer, resolve_model

    return load_tokenizer(resolve_model("tiny"))


@pytest.fixture(scope="module")
def wide():
    """The tiny Llama at hidden 256 / MLP 512 (K-quants need input sizes that are multiples of 256; the test
    model's 128 would put every layer in llama.cpp's fallback type), with sharp logits (no near-ties)."""
    from transformers import LlamaForCausalLM

    from ptqlib.tiny import tiny_config

    cfg = tiny_config()
    cfg.hidden_size, cfg.intermediate_size, cfg.head_dim = 256, 512, 64
    g = torch.Generator().manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        model.model.embed_tokens.weight.mul_(20)
    return model


@pytest.fixture(scope="module")
def files(wide, tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("kq")
    export_gguf(wide, tok, d / "f16.gguf", type="f16")
    for t in ("Q4_K_M", "Q3_K_M", "Q6_K"):
        quantize_file(d / "f16.gguf", d / f"{t}.gguf", t)
    return d


def test_an_f16_file_reads_back_to_the_fp16_weights_in_place(wide, files):
    """The inverse of the export's names and rotary row order: an F16 file loads into a fresh model as the
    original weights rounded to fp16, bit for bit (a wrong row order would scramble q and k)."""
    fresh = copy.deepcopy(wide)
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    types = load_weights(fresh, files / "f16.gguf")
    assert set(types) == {g for g, _, _ in gguf_names(wide).values()}
    for (name, p), q in zip(wide.named_parameters(), fresh.parameters()):
        want = p.detach().half().float() if p.dim() == 2 else p.detach()  # norms are F32 in the file
        assert torch.equal(q, want), name


@pytest.mark.parametrize("ktype, bound", [("Q3_K_M", 0.25), ("Q4_K_M", 0.12), ("Q6_K", 0.03)])
def test_kquant_weights_are_the_files_and_their_error_shrinks_with_bits(wide, files, ktype, bound):
    model = copy.deepcopy(wide)
    types = load_weights(model, files / f"{ktype}.gguf")
    stored = read_tensors(files / f"{ktype}.gguf", ["blk.0.ffn_up.weight"])["blk.0.ffn_up.weight"]
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, stored)  # not a rope layer: no reordering
    assert types["blk.0.ffn_up.weight"].startswith(f"Q{KQUANT_TYPES[ktype][1]}_K")  # a K-quant, not a fallback
    w, q = wide.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight
    rel = ((w - q).norm() / w.norm()).item()
    assert 0 < rel < bound, (ktype, rel)


def test_the_torch_model_of_a_kquant_file_scores_as_llama_cpp_does(wide, files, tok):
    """The de-quantized weights are llama.cpp's: its logits on text differ from torch's only by its
    activation rounding (8-bit blocks), far less than the Q4_K_M weights differ from the float ones."""
    model = copy.deepcopy(wide)
    load_weights(model, files / "Q4_K_M.gguf")
    ids = tok("def read(path): return open(path).read() if path else None", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        mine = model(torch.tensor([ids])).logits[0].numpy()
        floaty = wide(torch.tensor([ids])).logits[0].numpy()
    with llamacpp.LlamaCppModel(str(files / "Q4_K_M.gguf"), n_ctx=128, logits_all=True) as llm:
        theirs = llm.logits(ids)
    assert (mine.argmax(-1) == theirs.argmax(-1)).mean() >= 0.9
    assert np.abs(mine - theirs).max() < 0.25 * np.abs(mine - floaty).max()


def test_the_file_report_counts_the_stored_types(files):
    rep = file_report(files / "Q4_K_M.gguf")
    counts = rep.summary()["tensor_types"]
    assert counts.get("Q4_K", 0) > 0 and counts.get("Q6_K", 0) > 0  # the M mix: some tensors get 6 bits
    assert sum(t.nbytes for t in rep.tensors) < (files / "Q4_K_M.gguf").stat().st_size


def test_an_unknown_type_is_refused_before_llama_cpp_runs(files, tmp_path):
    with pytest.raises(ExportError, match="Q4_K_X.*valid are.*Q4_K_M"):
        quantize_file(files / "f16.gguf", tmp_path / "x.gguf", "Q4_K_X")
    assert list(tmp_path.iterdir()) == []


def test_the_importance_matrix_is_each_input_columns_mean_square_keyed_by_gguf_name(wide, tok):
    """llama-imatrix's statistic: for layer 0's q / k / v (one input: the normed embeddings) the mean over every
    token of each column's square, computed here without hooks; every linear the export writes has its entry."""
    ids = torch.tensor([tok("def read(path): return open(path).read() if path else None. " * 4,
                            add_special_tokens=False)["input_ids"][:48]] * 3)
    imatrix = importance(wide, ids, batch=2)
    with torch.no_grad():
        x = wide.model.layers[0].input_layernorm(wide.model.embed_tokens(ids)).reshape(-1, 256).double()
    want = (x * x).mean(0).float().numpy()
    for t in ("attn_q", "attn_k", "attn_v"):
        np.testing.assert_allclose(imatrix[f"blk.0.{t}.weight"], want, rtol=1e-5)
    linear = {g for hf, (g, _, _) in gguf_names(wide).items() if hf.endswith("proj.weight")}
    assert set(imatrix) == linear and imatrix["blk.1.ffn_down.weight"].shape == (512,)


def test_an_importance_matrix_reaches_llama_cpp_and_lowers_the_weighted_error(wide, files, tmp_path):
    """Columns marked important are rounded more carefully: with an imatrix that weighs 1 column in 8 by 10^4,
    llama.cpp's Q4_K rows err less on those columns (the weighted error falls) than without it."""
    n_in = 256
    w = np.ones(n_in, dtype=np.float32)
    w[::8] = 1e4
    imatrix = {g: (w if wide.get_parameter(hf).shape[1] == n_in else np.ones(512, np.float32))
               for hf, (g, _, _) in gguf_names(wide).items() if hf.endswith("proj.weight")}
    quantize_file(files / "f16.gguf", tmp_path / "im.gguf", "Q4_K_M", imatrix=imatrix)
    name = "blk.0.ffn_up.weight"
    plain = read_tensors(files / "Q4_K_M.gguf", [name])[name]
    weighted = read_tensors(tmp_path / "im.gguf", [name])[name]
    ref = wide.model.layers[0].mlp.up_proj.weight.detach().half().float()
    err = {k: float(((ref - q) ** 2 * torch.from_numpy(w)).sum()) for k, q in (("plain", plain), ("imatrix", weighted))}
    assert not torch.equal(plain, weighted) and err["imatrix"] < 0.7 * err["plain"], err
    with pytest.raises(ExportError, match="blk.0.attn_q.weight: values must be finite and >= 0"):
        quantize_file(files / "f16.gguf", tmp_path / "bad.gguf", "Q4_K_M",
                      imatrix={"blk.0.attn_q.weight": -w})


"""GGUF export: block layouts read back by the gguf package's own de-quantizer, exact code copies,
the rotary row permutation, and the refusals that name why a layer cannot be held exactly."""
import json

import gguf
import numpy as np
import pytest
import torch

from ptqlib.deploy.blocks import _rope_rows, pack_q4_1, pack_q8_0
from ptqlib.deploy.gguf import ExportError, export_gguf, read_tensor
from ptqlib.quant import QuantLinear, rtn_quantize_model

FP16_EPS = 2.0**-11  # half an ulp of fp16, relative


def _dequant(data: np.ndarray, qtype, shape) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(data, qtype).astype(np.float32)).reshape(shape)


def test_q4_1_blocks_match_the_gguf_reader():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (8, 96), generator=g)
    d, m = torch.rand(8, 3, generator=g) + 0.01, torch.randn(8, 3, generator=g)
    back = _dequant(pack_q4_1(codes, d, m), gguf.GGMLQuantizationType.Q4_1, (8, 96))
    want = d.half().float().repeat_interleave(32, 1) * codes + m.half().float().repeat_interleave(32, 1)
    assert torch.equal(back, want)  # the byte layout is exact: only d and m are rounded


def test_q8_0_blocks_match_the_gguf_reader():
    g = torch.Generator().manual_seed(1)
    q = torch.randint(-127, 128, (4, 64), generator=g)
    d = torch.rand(4, 2, generator=g) + 0.01
    back = _dequant(pack_q8_0(q, d), gguf.GGMLQuantizationType.Q8_0, (4, 64))
    assert torch.equal(back, d.half().float().repeat_interleave(32, 1) * q)


def _rope_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' rotary: pairs (j, j + hd/2)."""
    h = x.shape[-1] // 2
    rot = torch.cat([-x[..., h:], x[..., :h]], dim=-1)
    return x * torch.cat([cos, cos]) + rot * torch.cat([sin, sin])


def _rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """llama.cpp's rotary (LLM_ARCH_LLAMA): pairs (2j, 2j + 1)."""
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).reshape(x.shape)


def test_rope_rows_turn_half_split_rotary_into_interleaved():
    n_head, hd = 3, 8
    x = torch.randn(n_head * hd)
    ang = torch.rand(hd // 2) * 3
    cos, sin = ang.cos(), ang.sin()
    rows = _rope_rows(n_head * hd, n_head)
    assert sorted(rows.tolist()) == list(range(n_head * hd))
    for h in range(n_head):
        head = slice(h * hd, (h + 1) * hd)
        want = _rope_half(x[head], cos, sin)  # what transformers computes for this head
        got = _rope_interleaved(x[rows][head], cos, sin)  # what llama.cpp computes on the permuted rows
        assert torch.allclose(got, want[rows[head] - h * hd], atol=1e-6)


@pytest.fixture
def quantized_tiny(tiny_model):
    def make(bits=4, group_size=32, sym=False):
        rtn_quantize_model(tiny_model, bits=bits, group_size=group_size, sym=sym)
        return tiny_model
    return make


@pytest.fixture(scope="module")
def tiny_tok():
    from ptqlib.models import load_tokenizer, resolve_model

    return load_tokenizer(resolve_model("tiny"))


def _check_exported(model, path, report):
    """Every linear weight read back by gguf's reader equals ptqlib's, up to the fp16 rounding of d, m."""
    cfg = model.config
    for i, layer in enumerate(model.model.layers):
        for hf, gname, heads in [("self_attn.q_proj", "attn_q", cfg.num_attention_heads),
                                 ("self_attn.k_proj", "attn_k", cfg.num_key_value_heads),
                                 ("self_attn.v_proj", "attn_v", None), ("mlp.down_proj", "ffn_down", None)]:
            mod: QuantLinear = layer.get_submodule(hf)
            w = mod.dequantize_weight(torch.float32)
            if heads:
                w = w[_rope_rows(mod.out_features, heads)]
            back = read_tensor(path, f"blk.{i}.{gname}.weight")
            s, z = mod.scales.t().float(), mod.zero_points()
            bound = FP16_EPS * (s.abs().max() * (2**mod.bits - 1) + (s * z).abs().max()) * 1.01
            assert back.shape == w.shape
            assert (back - w).abs().max() <= bound
    assert 0 < report.max_abs_err_exact <= 1e-3
    assert report.max_abs_err_lossy == 0.0


@pytest.mark.parametrize("bits,group_size,sym,qtype", [(4, 32, False, "Q4_1"), (4, 64, True, "Q4_1"),
                                                       (3, 64, False, "Q4_1"), (2, 128, False, "Q4_1"),
                                                       (4, -1, False, "Q4_1"), (8, 32, True, "Q8_0")])
def test_exported_codes_equal_ptqlib_weights(quantized_tiny, tiny_tok, tmp_path, bits, group_size, sym, qtype):
    model = quantized_tiny(bits, group_size, sym)
    report = export_gguf(model, tiny_tok, tmp_path / "m.gguf")
    assert {t.gguf_type for t in report.tensors if ".attn_" in t.name or ".ffn_" in t.name} >= {qtype}
    assert all(t.exact for t in report.tensors)
    _check_exported(model, tmp_path / "m.gguf", report)
    # the packed file is ~4.5 / 8.5 bits per linear weight, whatever the codes' bits
    t = next(t for t in report.tensors if t.name == "blk.0.ffn_down.weight")
    assert t.nbytes == 128 * 256 // 32 * (20 if qtype == "Q4_1" else 34)


def test_float_zero_points_export_exactly(quantized_tiny, tiny_tok, tmp_path):
    model = quantized_tiny(4, 32)
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.set_float_zeros(m.zero_points() + torch.rand_like(m.zero_points()) - 0.5)  # a QA-LoRA-style merge
    report = export_gguf(model, tiny_tok, tmp_path / "m.gguf")
    _check_exported(model, tmp_path / "m.gguf", report)


def test_metadata_and_tokenizer(quantized_tiny, tiny_tok, tmp_path):
    model = quantized_tiny(4, 32)
    export_gguf(model, tiny_tok, tmp_path / "m.gguf")
    r = gguf.GGUFReader(tmp_path / "m.gguf")
    f = {k: v.contents() for k, v in r.fields.items() if k != "tokenizer.ggml.merges"}
    assert f["general.architecture"] == "llama"
    assert f["llama.block_count"] == 2 and f["llama.attention.head_count_kv"] == 2
    assert f["tokenizer.ggml.tokens"] == tiny_tok.convert_ids_to_tokens(list(range(len(tiny_tok))))
    assert f["tokenizer.ggml.eos_token_id"] == tiny_tok.eos_token_id
    assert f["tokenizer.ggml.pre"] == "gpt-2"
    assert "im_start" in f["tokenizer.chat_template"]
    assert len(r.fields["tokenizer.ggml.merges"].data) > 100
    names = {t.name for t in r.tensors}
    assert "output.weight" not in names  # tied embeddings: llama.cpp reuses token_embd
    assert not (tmp_path / "m.gguf.tmp").exists()


def test_refusals_name_the_reason(quantized_tiny, tiny_tok, tmp_path):
    model = quantized_tiny(4, 32)
    lin: QuantLinear = model.model.layers[0].mlp.up_proj
    lin.g_idx.copy_(lin.g_idx.flip(0))  # an act-order permutation
    with pytest.raises(ExportError, match="act-order"):
        export_gguf(model, tiny_tok, tmp_path / "a.gguf")
    assert not (tmp_path / "a.gguf").exists()
    report = export_gguf(model, tiny_tok, tmp_path / "a.gguf", lossy=True)  # re-quantized, error reported
    bad = [t for t in report.tensors if not t.exact]
    assert [t.name for t in bad] == ["blk.0.ffn_up.weight"] and bad[0].max_abs_err > 0


def test_group_not_multiple_of_32_and_asym_8bit_refused(tiny_model, tiny_tok, tmp_path):
    from ptqlib.tiny import build_tiny_model

    rtn_quantize_model(tiny_model, bits=4, group_size=16)
    with pytest.raises(ExportError, match="group size 16 is not a multiple of 32"):
        export_gguf(tiny_model, tiny_tok, tmp_path / "g16.gguf")
    m8 = build_tiny_model(seed=0)
    rtn_quantize_model(m8, bits=8, group_size=32, sym=False)
    with pytest.raises(ExportError, match="asymmetric 8-bit"):
        export_gguf(m8, tiny_tok, tmp_path / "a8.gguf")


def test_float_model_types(tiny_model, tiny_tok, tmp_path):
    r = export_gguf(tiny_model, tiny_tok, tmp_path / "f16.gguf")
    assert {t.gguf_type for t in r.tensors} == {"F16", "F32"}
    w = read_tensor(tmp_path / "f16.gguf", "blk.1.ffn_gate.weight")
    assert torch.allclose(w, tiny_model.model.layers[1].mlp.gate_proj.weight, rtol=FP16_EPS * 1.01, atol=1e-7)
    with pytest.raises(ExportError, match="only by quantizing"):
        export_gguf(tiny_model, tiny_tok, tmp_path / "q.gguf", type="q8_0")
    r = export_gguf(tiny_model, tiny_tok, tmp_path / "q.gguf", type="q8_0", lossy=True)
    assert 0 < r.max_abs_err_lossy < 0.01
    with pytest.raises(ExportError, match="valid are auto"):
        export_gguf(tiny_model, tiny_tok, tmp_path / "x.gguf", type="q5_k")


def test_cli_export(quantized_tiny, tiny_tok, tmp_path, capsys):
    from ptqlib.cli import main
    from ptqlib.quant import save_quantized

    run = tmp_path / "run"
    save_quantized(quantized_tiny(4, 64), run / "model", tokenizer=tiny_tok)
    (run / "artifact.json").write_text(json.dumps({"type": "quant", "path": "model"}))
    assert main(["export", str(run), "--format", "gguf", "-o", str(tmp_path / "m.gguf")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["tensor_types"]["Q4_1"] == 14 and summary["requantized"] == 0
    assert (tmp_path / "m.gguf").stat().st_size < 600_000


def test_an_export_onto_a_full_disk_leaves_nothing_behind(quantized_tiny, tiny_tok, tmp_path, monkeypatch):
    """The tensors fail half-way (ENOSPC): an error naming the file, no ``.tmp`` and no half GGUF left;
    an earlier export under the same name stays as it was."""
    model, out = quantized_tiny(4, 32), tmp_path / "m.gguf"
    export_gguf(model, tiny_tok, out)
    before = out.read_bytes()
    written = gguf.GGUFWriter.write_tensors_to_file

    def full_disk(self, *a, **k):
        written(self, *a, **k)  # the whole file, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", full_disk)
    with pytest.raises(ExportError, match=r"m\.gguf: could not write the GGUF file \(No space left on device\)"):
        export_gguf(model, tiny_tok, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]
    assert out.read_bytes() == before


def test_add_bos_token_is_written_once_and_false(quantized_tiny, tiny_tok, tmp_path, caplog):
    """The chat template's prompts have no BOS: one ``add_bos_token`` key, false, even where the tokenizer's own
    config asks for a BOS (it was written twice before: the reader's "Duplicated key" warning)."""
    import copy
    tok = copy.deepcopy(tiny_tok)
    tok.add_bos_token = True  # saved into tokenizer_config.json, which gguf's SpecialVocab reads
    with caplog.at_level("WARNING"):
        export_gguf(quantized_tiny(4, 32), tok, tmp_path / "m.gguf")
        r = gguf.GGUFReader(tmp_path / "m.gguf")
    assert "Duplicated key" not in caplog.text
    assert r.fields["tokenizer.ggml.add_bos_token"].contents() is False

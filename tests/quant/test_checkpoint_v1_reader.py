"""The saved GPTQ checkpoint read by a second, independent implementation of the v1 layout.

Written from the format's description, not from ``ptqlib.quant.pack``: a tensor packed along a
dimension is one little-endian bit stream per column (value k at bits [b*k, b*k + b) of
word0 | word1 << 32 | ...), ``qweight (in*b/32, out)`` packs codes along the input dim,
``qzeros (G, out*b/32)`` packs ``zero - 1`` along the output dim, and

    W[o, i] = scales[g_idx[i], o] * (q[i, o] - (z_stored[g_idx[i], o] + 1))

This reader uses Python integers for the bit stream (slow, obviously right), so a packing bug
in ptqlib cannot be mirrored by it.
"""
import json

import pytest
import torch
from safetensors.torch import load_file

from ptqlib.quant import QuantLinear, gptq_quantize_model, rtn_quantize_model, save_quantized
from ptqlib.quant.layers import find_linear_layers

# the keys GPU loaders read from quantization_config (vLLM: bits, group_size, desc_act;
# GPTQModel / transformers' GPTQ integration: also quant_method, sym, checkpoint_format)
LOADER_KEYS = {"quant_method", "bits", "group_size", "desc_act", "sym", "checkpoint_format"}


def _stream_unpack(words: list[int], bits: int, n: int) -> list[int]:
    """n values of ``bits`` bits from int32 words read as one little-endian stream."""
    stream = 0
    for k, w in enumerate(words):
        stream |= (w & 0xFFFFFFFF) << (32 * k)
    return [(stream >> (bits * j)) & ((1 << bits) - 1) for j in range(n)]


def read_v1_layer(sd: dict, prefix: str, bits: int) -> torch.Tensor:
    """The float weight (out, in) of one layer from its saved tensors."""
    qweight, qzeros = sd[prefix + "qweight"].tolist(), sd[prefix + "qzeros"].tolist()
    scales, g_idx = sd[prefix + "scales"].float(), sd[prefix + "g_idx"].tolist()
    n_in, n_out = len(g_idx), scales.shape[1]
    codes = [_stream_unpack([row[o] for row in qweight], bits, n_in) for o in range(n_out)]  # per output: (in,)
    zeros = [_stream_unpack(qzeros[g], bits, n_out) for g in range(len(qzeros))]  # per group: (out,)
    W = torch.empty(n_out, n_in)
    for o in range(n_out):
        for i in range(n_in):
            g = g_idx[i]
            W[o, i] = scales[g, o] * (codes[o][i] - (zeros[g][o] + 1))
    return W


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("method", ["rtn", "gptq", "gptq-act-order"])
def test_saved_checkpoint_reads_back_independently(tiny_model, tmp_path, bits, method):
    torch.manual_seed(0)
    if method == "rtn":
        rtn_quantize_model(tiny_model, bits=bits, group_size=32, sym=False)
    else:
        calib = [torch.randint(0, 1024, (1, 32), generator=torch.Generator().manual_seed(i)) for i in range(4)]
        act = method == "gptq-act-order"  # static_groups only with act-order (the default True elsewhere)
        gptq_quantize_model(tiny_model, calib, bits=bits, group_size=32, sym=False, act_order=act,
                            static_groups=not act, progress=False)
    save_quantized(tiny_model, tmp_path)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert LOADER_KEYS <= set(qc), LOADER_KEYS - set(qc)
    assert qc["quant_method"] == "gptq" and qc["checkpoint_format"] == "gptq" and qc["bits"] == bits
    assert qc["group_size"] == 32 and qc["desc_act"] is (method == "gptq-act-order")
    assert qc["static_groups"] is False  # never claimed without act-order
    sd = load_file(tmp_path / "model.safetensors")
    layers = find_linear_layers(tiny_model, (QuantLinear,))
    for name in ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"):
        ours = layers[name].dequantize_weight().float()
        theirs = read_v1_layer(sd, name + ".", bits)
        assert torch.equal(theirs, ours), (name, (theirs - ours).abs().max())
    if method == "gptq-act-order":  # a real permutation, so the reader's g_idx path was exercised
        g = sd["model.layers.0.self_attn.k_proj.g_idx"]
        assert not torch.equal(g, torch.sort(g).values)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_non_negative_groups_stay_readable_by_v1_readers(tiny_model, tmp_path, bits, method):
    """Groups without negative weights get zero point >= 1, so the v1 file reads back as ptqlib does."""
    lin = tiny_model.model.layers[0].self_attn.k_proj
    with torch.no_grad():
        lin.weight[:, :32].abs_()  # group 0 of every row is non-negative: the reference grid's zero is 0 there
        lin.weight[:3, 32:64] = lin.weight[:3, 32:64].abs() + 0.01
    if method == "rtn":
        rtn_quantize_model(tiny_model, bits=bits, group_size=32, sym=False)
    else:
        calib = [torch.randint(0, 1024, (1, 32), generator=torch.Generator().manual_seed(i)) for i in range(4)]
        gptq_quantize_model(tiny_model, calib, bits=bits, group_size=32, sym=False, progress=False)
    save_quantized(tiny_model, tmp_path)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["checkpoint_format"] == "gptq"
    name = "model.layers.0.self_attn.k_proj"
    ours = find_linear_layers(tiny_model, (QuantLinear,))[name].dequantize_weight().float()
    assert torch.equal(read_v1_layer(load_file(tmp_path / "model.safetensors"), name + ".", bits), ours)


def test_zero_point_zero_is_written_in_the_v2_layout(tiny_model, tmp_path):
    """Codes with a zero point of 0 (not from ptqlib's grids) go to a gptq_v2 file: qzeros = zero."""
    from ptqlib.quant import load_quantized
    from ptqlib.quant.layers import set_module

    torch.manual_seed(0)
    rtn_quantize_model(tiny_model, bits=4, group_size=32, sym=False)
    name = "model.layers.0.self_attn.k_proj"
    q = find_linear_layers(tiny_model, (QuantLinear,))[name]
    codes = torch.randint(0, 16, (q.out_features, q.in_features))
    zeros = q.zero_points().clone()
    zeros[:5, 0] = 0  # five groups whose zero point v1 cannot carry to v1 readers
    new = QuantLinear.from_codes(codes, q.scales.t().clone(), zeros, bits=4, group_size=32)
    set_module(tiny_model, name, new)
    with pytest.warns(UserWarning, match="5 groups have zero point 0.*gptq_v2"):
        save_quantized(tiny_model, tmp_path)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["checkpoint_format"] == "gptq_v2"
    sd = load_file(tmp_path / "model.safetensors")
    # independent v2 read: the stored zeros are the zero points, no offset
    zs = [_stream_unpack(row, 4, q.out_features) for row in sd[name + ".qzeros"].tolist()]
    assert [zs[0][o] for o in range(5)] == [0] * 5 and zs[0][5] == int(zeros[5, 0])
    back = load_quantized(tmp_path)
    assert torch.equal(back.get_submodule(name).dequantize_weight(), new.dequantize_weight())

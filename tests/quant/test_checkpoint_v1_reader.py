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

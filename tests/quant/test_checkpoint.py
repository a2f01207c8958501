import json

import pytest
import torch

from ptqlib.quant import QuantLinear, load_quantized, rtn_quantize_model, save_quantized
from ptqlib.quant.layers import find_linear_layers


def _logits(model, device):
    x = torch.randint(0, 1024, (2, 12), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        return model.to(device)(x).logits


@pytest.mark.parametrize("bits", [3, 4])
def test_roundtrip_bit_exact(tiny_model, tmp_path, bits, device):
    rtn_quantize_model(tiny_model, bits=bits, group_size=64, sym=False)
    save_quantized(tiny_model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["checkpoint_format"] == "gptq"
    assert (qc["bits"], qc["group_size"], qc["desc_act"], qc["sym"]) == (bits, 64, False, False)
    loaded = load_quantized(tmp_path, device=device)
    assert len(find_linear_layers(loaded, (QuantLinear,))) == 14
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # tied embeddings survive
    a, b = tiny_model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k].cpu(), b[k].cpu()) and a[k].dtype == b[k].dtype for k in a)
    assert torch.equal(_logits(tiny_model, device), _logits(loaded, device))


def test_float_zeros_and_act_order_roundtrip(tiny_model, tmp_path):
    rtn_quantize_model(tiny_model, bits=4, group_size=32, sym=True)
    layers = find_linear_layers(tiny_model, (QuantLinear,))
    first = next(iter(layers.values()))
    first.set_float_zeros(first.zero_points() + 0.5)
    perm = torch.randperm(first.in_features)
    first.g_idx.copy_(first.g_idx[perm])
    save_quantized(tiny_model, tmp_path)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "ptqlib" and qc["desc_act"] is True and qc["sym"] is False
    loaded = load_quantized(tmp_path)
    assert loaded.get_submodule(next(iter(layers))).float_zeros
    assert torch.equal(_logits(tiny_model, "cpu"), _logits(loaded, "cpu"))


def test_sym_flag_derived(tiny_model, tmp_path):
    rtn_quantize_model(tiny_model, bits=4, group_size=-1, sym=True)
    save_quantized(tiny_model, tmp_path)
    qc = json.loads((tmp_path / "quantize_config.json").read_text())
    assert qc["sym"] is True and qc["group_size"] == -1


def test_half_precision_state_roundtrip(tiny_model, tmp_path):
    model = tiny_model.to(torch.float16)
    rtn_quantize_model(model, bits=2, group_size=32, sym=False)
    save_quantized(model, tmp_path)
    loaded = load_quantized(tmp_path)
    assert loaded.model.layers[0].mlp.up_proj.scales.dtype == torch.float16
    a, b = model.state_dict(), loaded.state_dict()
    # persistent state is bit-exact (non-persistent rotary buffers are rebuilt in float32, as
    # from_pretrained does, whereas model.to(float16) had cast them)
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


def test_generation_config_survives_the_round_trip(tmp_path):
    """A model whose config says use_cache=False (as after training) still generates with a cache."""
    from transformers import GenerationConfig

    from ptqlib.quant import load_quantized, rtn_quantize_model, save_quantized
    from ptqlib.tiny import build_tiny_model

    model = build_tiny_model(seed=0)
    model.config.use_cache = False
    model.generation_config = GenerationConfig(use_cache=True, max_new_tokens=7, pad_token_id=0)
    rtn_quantize_model(model, bits=4, group_size=32, sym=False)
    save_quantized(model, tmp_path)
    loaded = load_quantized(tmp_path)
    assert loaded.generation_config.use_cache is True and loaded.generation_config.max_new_tokens == 7

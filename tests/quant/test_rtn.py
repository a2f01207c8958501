import torch
from torch import nn

from ptqlib.quant import QuantLinear, find_linear_layers, rtn_quantize_model


def test_find_linear_layers_excludes_head(tiny_model):
    names = find_linear_layers(tiny_model)
    assert len(names) == 2 * 7
    assert all(n.startswith("model.layers.") for n in names)
    layer0 = find_linear_layers(tiny_model.model.layers[0])
    assert set(layer0) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}


def test_rtn_quantize_model(tiny_model):
    x = torch.randint(0, 1024, (1, 16))
    with torch.no_grad():
        ref = tiny_model(x).logits
    stats = rtn_quantize_model(tiny_model, bits=8, group_size=32, sym=False)
    assert stats["n_layers"] == 14 and stats["bits"] == 8
    assert not find_linear_layers(tiny_model)  # no nn.Linear left in the decoder
    assert len(find_linear_layers(tiny_model, (QuantLinear,))) == 14
    assert isinstance(tiny_model.lm_head, nn.Linear)
    assert all(v["rel_weight_err"] < 1e-4 for v in stats["layers"].values())
    with torch.no_grad():
        out = tiny_model(x).logits
    torch.testing.assert_close(out, ref, atol=0.05, rtol=0)

"""bitsandbytes NF4 at evaluation: in bf16 each Linear4bit multiplies by its weight de-quantized once
(bitsandbytes' own arithmetic, without its fused CPU kernel at every call); fp32 keeps bnb's path."""
import copy

import pytest
import torch

from ptqlib import artifacts, precision
from ptqlib.methods.bnb import dense_inference
from ptqlib.stages import quantize as ptq
from ptqlib.study.params import QuantizeParams


@pytest.fixture(scope="module")
def nf4_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("nf4")
    p = QuantizeParams(method="nf4").__dict__
    model, tok, _ = ptq.quantize("tiny", p)
    ptq.save(model, tok, p, out / "nf4", "tiny")
    return out / "nf4"


def test_bf16_inference_multiplies_by_the_weight_dequantized_once(nf4_dir, monkeypatch):
    import bitsandbytes.functional as bnbF
    from bitsandbytes.nn import Linear4bit

    monkeypatch.setenv(precision.FORCE_ENV, "1")
    model, _, _ = artifacts.load(nf4_dir, "cpu")
    own = copy.deepcopy(model)  # bitsandbytes' own path, computing in bf16
    layer = next(m for m in model.modules() if isinstance(m, Linear4bit))
    W = bnbF.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(torch.bfloat16)
    precision.cast_for_inference(model, "bf16")
    assert dense_inference(model, torch.bfloat16) > 0
    assert all(getattr(m, "_ptqlib_dense", False) for m in model.modules() if isinstance(m, Linear4bit))
    x = torch.randn(3, 5, layer.in_features)
    b = None if layer.bias is None else layer.bias.to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(layer(x), torch.nn.functional.linear(x.to(torch.bfloat16), W, b).float())
        for m in own.modules():
            if isinstance(m, Linear4bit):
                m.compute_dtype = torch.bfloat16
        precision.cast_for_inference(own, "fp32")  # fp32: bitsandbytes' own forward, untouched
        assert not any(getattr(m, "_ptqlib_dense", False) for m in own.modules())
        for m in own.modules():  # the float parameters in bf16 as cast_for_inference does
            for prm in m.parameters(recurse=False):
                if prm.is_floating_point():
                    prm.data = prm.data.to(torch.bfloat16)
        ids = torch.randint(0, 1024, (2, 24), generator=torch.Generator().manual_seed(0))
        ours, theirs = model(input_ids=ids).logits.float(), own(input_ids=ids).logits.float()
    assert ((ours - theirs).norm() / theirs.norm()) < 2e-2  # bf16 rounding of two orders of the same sums

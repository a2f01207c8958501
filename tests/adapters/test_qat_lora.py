"""QAT-LoRA (decoupled baseline): fake-quant gradients, forward, export, training."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from ptqlib.adapters.l4q import count_trainable_parameters, fake_quantize
from ptqlib.adapters.qat_lora import (
    FakeQuantFunction,
    QATLoRALinear,
    apply_qat_lora,
    export_qat_lora,
)
from ptqlib.quant.grid import signed_range

OUT, IN = 64, 96


def reference_fake_quant(W, S, b, bits):
    """``S * round(clamp((W - b)/S)) + b`` with autograd through clamp and an STE round."""
    qn, qp = signed_range(bits)
    w = (W.reshape(W.shape[0], S.shape[1], -1) - b[..., None]) / S[..., None]
    wc = torch.clamp(w, qn, qp)
    wt = wc + (torch.round(wc) - wc).detach()
    return (wt * S[..., None] + b[..., None]).reshape(W.shape)


def make_layer(bits, group_size, device, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(IN, OUT, bias=True).to(device=device, dtype=dtype)
    layer = QATLoRALinear(base, bits=bits, group_size=group_size, rank=4, alpha=8.0)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.05)
        layer.q_offset.normal_(0, 0.01)
        layer.q_scale[::2].mul_(0.6)  # clip some weights
    return layer


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 32])
def test_fake_quant_grads_match_reference(bits, group_size, device):
    layer = make_layer(bits, group_size, device)
    W = layer.weight.detach().clone().requires_grad_()  # also check the STE gradient to W
    S, b = layer.q_scale.detach().clone().requires_grad_(), layer.q_offset.detach().clone().requires_grad_()
    qn, qp = signed_range(bits)
    out = FakeQuantFunction.apply(W, S, b, qn, qp, 1.0)
    g = torch.randn_like(out)
    out.backward(g)
    Wr, Sr, br = (t.detach().clone().requires_grad_() for t in (W, S, b))
    ref = reference_fake_quant(Wr, Sr, br, bits)
    ref.backward(g)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, fake_quantize(W.detach(), S.detach(), b.detach(), bits))
    for got, exp in [(W.grad, Wr.grad), (S.grad, Sr.grad), (b.grad, br.grad)]:
        torch.testing.assert_close(got, exp, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("bits", [2, 4])
def test_layer_forward_and_grads(bits, device):
    layer = make_layer(bits, 32, device)
    x = torch.randn(2, 5, IN, dtype=torch.float64, device=device, requires_grad=True)
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    A, B, S, b = (t.detach().clone().requires_grad_()
                  for t in (layer.lora_A, layer.lora_B, layer.q_scale, layer.q_offset))
    xr = x.detach().clone().requires_grad_()
    yr = xr @ reference_fake_quant(layer.weight, S, b, bits).t() + layer.bias \
        + layer.scaling * (xr @ A.t()) @ B.t()
    yr.backward(dy)
    torch.testing.assert_close(y, yr, rtol=1e-12, atol=1e-12)
    for got, exp in [(x.grad, xr.grad), (layer.lora_A.grad, A.grad), (layer.lora_B.grad, B.grad),
                     (layer.q_scale.grad, S.grad), (layer.q_offset.grad, b.grad)]:
        torch.testing.assert_close(got, exp, rtol=1e-10, atol=1e-10)
    assert layer.weight.grad is None


@pytest.mark.parametrize("bits", [3, 4])
def test_export_keeps_unmerged_lora(bits, device):
    pytest.importorskip("ptqlib.quant.qlinear")
    from ptqlib.quant.qlinear import QuantLinear

    layer = make_layer(bits, 32, device, dtype=torch.float32)
    x = torch.randn(4, IN, device=device)
    with torch.no_grad():
        y = layer(x)
        exp = layer.export()
        torch.testing.assert_close(exp(x), y, rtol=1e-5, atol=1e-5)
        assert isinstance(exp.base, QuantLinear)
        torch.testing.assert_close(exp.base.dequantize_weight(torch.float32), layer.fake_quantized_weight(),
                                   rtol=1e-5, atol=1e-6)
        # The decoupling: W_fq + s B A is off the grid; re-quantizing it changes the layer.
        merged = layer.fake_quantized_weight() + layer.scaling * layer.lora_B @ layer.lora_A
        requant = fake_quantize(merged, layer.q_scale, layer.q_offset, bits)
        assert (requant - merged).abs().max() > 1e-3


def test_tiny_model_trains_and_exports(device):
    from ptqlib.tiny import build_tiny_model

    model = apply_qat_lora(build_tiny_model(seed=0).to(device), bits=3, group_size=32, rank=4, alpha=8)
    assert sum(isinstance(m, QATLoRALinear) for m in model.modules()) == 14
    counts = count_trainable_parameters(model)
    assert counts["trainable"] == counts["lora"] + counts["quantizer"] > 0
    ids = torch.randint(3, 1024, (4, 32), generator=torch.Generator().manual_seed(1)).to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.01)
    model.train()
    losses = []
    for _ in range(30):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    assert losses[-1] < losses[0] - 0.5, losses
    with torch.no_grad():
        trained = model(input_ids=ids, labels=ids).loss
    pytest.importorskip("ptqlib.quant.qlinear")
    export_qat_lora(model)
    assert not any(isinstance(m, QATLoRALinear) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, labels=ids).loss, trained, rtol=1e-4, atol=1e-4)


def test_save_exported_and_load_give_identical_outputs(tmp_path):
    """The deployable QAT-LoRA artifact (GPTQ-layout base + LoRA branch) reloads to the same logits."""
    from ptqlib.adapters.qat_lora import QuantLinearWithLoRA, apply_qat_lora, load_exported, save_exported
    from ptqlib.quant import load_quantized
    from ptqlib.tiny import build_tiny_model

    model = apply_qat_lora(build_tiny_model(seed=0), bits=4, group_size=32, rank=4, alpha=8.0)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)  # a non-zero branch, as after training
    x = torch.randint(0, 1024, (2, 12))
    with torch.no_grad():
        before = model(x).logits
    save_exported(model, tmp_path / "model", tmp_path / "adapter")
    loaded = load_exported(load_quantized(tmp_path / "model"), tmp_path / "adapter").eval()
    assert sum(isinstance(m, QuantLinearWithLoRA) for m in loaded.modules()) == 14
    with torch.no_grad():
        assert torch.allclose(loaded(x).logits, before, atol=1e-4)


def test_bf16_export_keeps_fp32_zero_points():
    """As for L4Q (shared LearnedQuantLinear): the exported zero points are -Q_N - b / S in fp32."""
    torch.manual_seed(0)
    layer = QATLoRALinear(nn.Linear(64, 16).to(torch.bfloat16), bits=4, group_size=32, rank=2)
    with torch.no_grad():
        layer.q_offset.add_(torch.randn_like(layer.q_offset) * 1e-3)
        q = layer.export().base
    want = (-signed_range(4)[0] - layer.q_offset / layer.q_scale).float()
    assert q.fzeros.dtype == torch.float32
    assert torch.equal(q.zero_points().float(), want)

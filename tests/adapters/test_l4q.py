"""L4Q: custom backward vs plain autograd, export exactness, memory, training on the tiny model."""
from __future__ import annotations

import gc
import math

import pytest
import torch
from torch import nn

from ptqlib.adapters.l4q import (
    L4QLinear,
    apply_l4q,
    count_trainable_parameters,
    export_l4q,
    l4q_init,
)
from ptqlib.quant.grid import signed_range

OUT, IN = 64, 96  # W numel 6144: distinct from every other tensor size in these tests;
# both multiples of 32 / bits as QuantLinear packing needs


def reference_l4q(x, W0, A, B, S, b, s, bits, bias=None):
    """L4Q written plainly: autograd through clamp, STE for round (the paper's equations)."""
    qn, qp = signed_range(bits)
    out_f, in_f = W0.shape
    W = W0 + s * (B @ A)
    w = (W.reshape(out_f, S.shape[1], -1) - b[..., None]) / S[..., None]
    wc = torch.clamp(w, qn, qp)
    wt = wc + (torch.round(wc) - wc).detach()  # straight-through round
    Wq = (wt * S[..., None] + b[..., None]).reshape(out_f, in_f)
    y = x @ Wq.t()
    return y if bias is None else y + bias


def make_layer(bits, group_size, device, dtype=torch.float64, seed=0):
    """An L4QLinear with non-trivial B, b and a shrunk S so some weights are clipped."""
    torch.manual_seed(seed)
    base = nn.Linear(IN, OUT, bias=True).to(device=device, dtype=dtype)
    layer = L4QLinear(base, bits=bits, group_size=group_size, rank=4, alpha=8.0)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.05)
        layer.q_offset.normal_(0, 0.01)
        # shrink some groups' scales so the clamp (outside-range branch) is exercised
        layer.q_scale[::2].mul_(0.6)
    return layer


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 32])
def test_backward_matches_reference(bits, group_size, device):
    layer = make_layer(bits, group_size, device)
    x = torch.randn(3, 5, IN, dtype=torch.float64, device=device, requires_grad=True)
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)

    A, B, S, b = (t.detach().clone().requires_grad_()
                  for t in (layer.lora_A, layer.lora_B, layer.q_scale, layer.q_offset))
    xr = x.detach().clone().requires_grad_()
    yr = reference_l4q(xr, layer.weight, A, B, S, b, layer.scaling, bits, layer.bias)
    yr.backward(dy)

    # the test really covers both branches of the STE
    qn, qp = signed_range(bits)
    w = (layer.weight + layer.scaling * B @ A).reshape(OUT, S.shape[1], -1)
    w = (w - b[..., None]) / S[..., None]
    assert ((w < qn) | (w > qp)).any() and ((w > qn) & (w < qp)).any()

    torch.testing.assert_close(y, yr, rtol=1e-12, atol=1e-12)
    for got, ref in [(x.grad, xr.grad), (layer.lora_A.grad, A.grad), (layer.lora_B.grad, B.grad),
                     (layer.q_scale.grad, S.grad), (layer.q_offset.grad, b.grad)]:
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    assert layer.weight.grad is None and layer.bias.grad is None


def test_lsq_grad_scale(device):
    layer = make_layer(4, 32, device)
    x = torch.randn(7, IN, dtype=torch.float64, device=device)
    layer(x).square().sum().backward()
    g_plain = layer.q_scale.grad.clone()
    layer.zero_grad()
    layer.lsq_grad_scale = True
    layer(x).square().sum().backward()
    torch.testing.assert_close(layer.q_scale.grad, g_plain / math.sqrt(32 * 7))


def test_init_covers_range():
    torch.manual_seed(0)
    W0 = torch.randn(OUT, IN, dtype=torch.float64)
    for bits in (2, 3, 4, 8):
        qn, qp = signed_range(bits)
        S, b = l4q_init(W0, bits, 32)
        Wg = W0.reshape(OUT, 3, 32)
        ref = torch.maximum(Wg.amin(-1).abs() / -qn, Wg.amax(-1).abs() / qp)
        torch.testing.assert_close(S, ref)
        assert torch.all(b == 0)
        # nothing is clipped by more than rounding at init: codes of the extremes are in range
        w = Wg / S[..., None]
        assert w.min() >= qn - 1e-9 and w.max() <= qp + 1e-9


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 32])
def test_export_equals_training_forward(bits, group_size, device):
    pytest.importorskip("ptqlib.quant.qlinear")
    layer = make_layer(bits, group_size, device, dtype=torch.float32)
    x = torch.randn(4, IN, device=device)
    with torch.no_grad():
        y = layer(x)
        Wq = layer.merged_quantized_weight()
        q = layer.export()
    assert q.bits == bits and q.group_size == group_size
    codes = q.unpack_codes()
    assert codes.min() >= 0 and codes.max() <= 2 ** bits - 1
    torch.testing.assert_close(codes, layer.integer_codes() - signed_range(bits)[0])
    # fzeros are float32 in QuantLinear: a few ulps of zero * scale
    torch.testing.assert_close(q.dequantize_weight(torch.float32), Wq, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(q(x), y, rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in q.parameters())


def _weight_sized_live(numel):
    """ids of live Python tensors with exactly ``numel`` elements."""
    gc.collect()
    return {id(o) for o in gc.get_objects() if type(o) in (torch.Tensor, nn.Parameter) and o.numel() == numel}


def test_saves_no_weight_sized_tensors(device):
    layer = make_layer(4, 32, device, dtype=torch.float32)
    numel = layer.weight.numel()
    x = torch.randn(2, 6, IN, device=device, requires_grad=True)

    saved = []

    def pack(t):
        saved.append((t.numel(), t.data_ptr()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    big = [p for n, p in saved if n == numel]
    assert big == [layer.weight.data_ptr()], "only W0 itself may be saved at weight size"
    y.sum().backward()

    # the plain-autograd reference keeps several weight-sized tensors (what L4Q avoids)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        reference_l4q(x, layer.weight, layer.lora_A, layer.lora_B, layer.q_scale, layer.q_offset,
                      layer.scaling, 4)
    assert sum(n == numel for n, _ in saved) >= 3

    # no weight-sized tensor survives training steps, and repeated steps do not grow memory
    before = _weight_sized_live(numel)
    if device.type == "cuda":
        torch.cuda.synchronize()
        mem0 = torch.cuda.memory_allocated(device)
    for _ in range(3):
        layer(x).sum().backward()
    assert _weight_sized_live(numel) - before == set()
    if device.type == "cuda":
        torch.cuda.synchronize()
        # grads of A, B, S, b, x exist already from the first backward: no growth at all
        assert torch.cuda.memory_allocated(device) - mem0 < numel * 4


def test_autocast_keeps_x_in_its_dtype_and_grads_match(device, monkeypatch):
    """Under bf16 autocast the layer saves X cast to bf16 (as an nn.Linear there does) and forms
    dY^T X in bf16; every gradient stays within bf16 rounding of the fp64 reference."""
    from ptqlib import precision

    monkeypatch.setenv(precision.FORCE_ENV, "1")
    layer = make_layer(4, 32, device, dtype=torch.float32)
    x = torch.randn(3, 5, IN, device=device, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            y = layer(x)
    assert y.dtype == torch.bfloat16
    assert [t.dtype for t in saved if t.shape == x.shape] == [torch.bfloat16]
    dy = torch.randn(y.shape, device=device)
    y.backward(dy.to(y.dtype))
    assert x.grad.dtype == torch.float32

    A, B, S, b = (t.detach().double().requires_grad_() for t in (layer.lora_A, layer.lora_B, layer.q_scale, layer.q_offset))
    xr = x.detach().double().requires_grad_()
    yr = reference_l4q(xr, layer.weight.double(), A, B, S, b, layer.scaling, 4, layer.bias.double())
    yr.backward(dy.double())
    for got, ref in [(y, yr), (x.grad, xr.grad), (layer.lora_A.grad, A.grad), (layer.lora_B.grad, B.grad),
                     (layer.q_scale.grad, S.grad), (layer.q_offset.grad, b.grad)]:
        err = (got.double() - ref).norm() / ref.norm()
        assert err < 2e-2, err  # bf16 has an 8-bit significand: ~0.4% per rounding


def test_apply_l4q_tiny_model(tiny_model):
    n_linear = sum(isinstance(m, nn.Linear) for n, m in tiny_model.named_modules() if ".layers." in n)
    model = apply_l4q(tiny_model, bits=4, group_size=32, rank=4, alpha=8)
    layers = [m for m in model.modules() if isinstance(m, L4QLinear)]
    assert len(layers) == n_linear == 14
    assert isinstance(model.lm_head, nn.Linear) and not model.lm_head.weight.requires_grad
    expected = sum(4 * (l.in_features + l.out_features) for l in layers)
    quant = sum(2 * l.out_features * l.in_features // 32 for l in layers)
    counts = count_trainable_parameters(model)
    assert counts == {"trainable": expected + quant, "total": counts["total"], "lora": expected,
                      "quantizer": quant}
    assert {n.split(".")[-1] for n, p in model.named_parameters() if p.requires_grad} == {
        "lora_A", "lora_B", "q_scale", "q_offset"}


def test_target_modules_and_validation(tiny_model):
    model = apply_l4q(tiny_model, bits=3, group_size=-1, rank=2, alpha=4, target_modules=["q_proj", "down_proj"])
    names = sorted(n for n, m in model.named_modules() if isinstance(m, L4QLinear))
    assert names == ["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj",
                     "model.layers.1.mlp.down_proj", "model.layers.1.self_attn.q_proj"]
    with pytest.raises(ValueError):
        L4QLinear(nn.Linear(96, 8), bits=4, group_size=64)
    with pytest.raises(ValueError):
        L4QLinear(nn.Linear(96, 8), bits=5, group_size=32)


def _train(model, ids, steps=30, lr=3e-3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


@pytest.mark.parametrize("bits", [4, 3])
def test_tiny_model_trains_and_exports(bits, device):
    from ptqlib.tiny import build_tiny_model

    model = apply_l4q(build_tiny_model(seed=0).to(device), bits=bits, group_size=32, rank=4, alpha=8)
    ids = torch.randint(3, 1024, (4, 32), generator=torch.Generator().manual_seed(1)).to(device)
    losses = _train(model, ids)
    assert losses[-1] < losses[0] - 0.5, losses
    with torch.no_grad():
        trained = model(input_ids=ids, labels=ids).loss
    pytest.importorskip("ptqlib.quant.qlinear")
    from ptqlib.quant.qlinear import QuantLinear

    export_l4q(model)
    assert not any(isinstance(m, L4QLinear) for m in model.modules())
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 14
    assert not any("lora" in n or "q_scale" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        exported = model(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(exported, trained, rtol=1e-4, atol=1e-4)


def test_bf16_export_keeps_fp32_zero_points():
    """A bf16 run exports the zero points it trained with: -Q_N - b / S in fp32, not rounded to bf16."""
    layer = make_layer(4, 32, torch.device("cpu"), dtype=torch.bfloat16)
    with torch.no_grad():
        layer.q_offset.add_(torch.randn_like(layer.q_offset) * 1e-3)  # offsets that bf16 cannot hold exactly
        q = layer.export()
    want = (-signed_range(4)[0] - layer.q_offset / layer.q_scale).float()  # (out, G) in fp32
    assert q.fzeros.dtype == torch.float32
    assert torch.equal(q.zero_points().float(), want)

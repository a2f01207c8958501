import pytest
import torch
from torch import nn

from ptqlib.quant.qlinear import QuantLinear, quantized_nbytes
from ptqlib.quant.uniform import rtn_quantize

BITS = [2, 3, 4, 8]


def reference_weight(codes, scales, zeros, g_idx):
    """W[o, i] = scales[o, g_idx[i]] * (q[o, i] - zeros[o, g_idx[i]]) (INTERFACES.md)."""
    g = g_idx.long()
    return scales[:, g] * (codes.to(scales.dtype) - zeros[:, g].to(scales.dtype))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", [-1, 32])
def test_from_codes_views_and_forward(bits, group_size, device):
    torch.manual_seed(0)
    w = torch.randn(64, 128, device=device)
    codes, scales, zeros = rtn_quantize(w, bits, group_size, sym=False)
    bias = torch.randn(64, device=device)
    g_idx = None
    if group_size != -1:  # act-order style permuted group assignment
        g_idx = (torch.arange(128, device=device) // group_size)[torch.randperm(128, device=device)]
    layer = QuantLinear.from_codes(codes, scales, zeros, g_idx=g_idx, bias=bias, bits=bits, group_size=group_size)
    assert (layer.in_features, layer.out_features, layer.bits, layer.group_size) == (128, 64, bits, group_size)
    assert layer.qweight.shape == (128 * bits // 32, 64) and layer.qweight.dtype == torch.int32
    assert layer.scales.shape == (scales.shape[1], 64)
    assert torch.equal(layer.unpack_codes(), codes)
    assert torch.equal(layer.zero_points(), zeros)
    w_ref = reference_weight(codes, scales, zeros, layer.g_idx)
    assert torch.equal(layer.dequantize_weight(), w_ref)
    x = torch.randn(2, 5, 128, device=device)
    torch.testing.assert_close(layer(x), x @ w_ref.T + bias)
    assert not any(True for _ in layer.parameters())  # nothing trainable, codes frozen


def test_forward_follows_input_dtype(device):
    torch.manual_seed(0)
    codes, scales, zeros = rtn_quantize(torch.randn(32, 64), 4, 32, False)
    layer = QuantLinear.from_codes(codes, scales.half(), zeros, bits=4).to(device)
    assert layer.scales.dtype == torch.float16 and layer.group_size == 32
    x = torch.randn(3, 64, device=device, dtype=torch.bfloat16)
    assert layer(x).dtype == torch.bfloat16
    xf = torch.randn(3, 64, device=device, requires_grad=True)
    layer(xf).sum().backward()  # gradients flow to the input (LoRA training needs this)
    assert xf.grad is not None and layer.qweight.grad is None


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("float_zeros", [False, True])
def test_dequantize_equals_the_formula_in_every_dtype(bits, float_zeros, device):
    """Contiguous groups (the in-place path): W_hat = scale * (q - zero) bit for bit, the
    subtraction exact whether it runs on integers or floats."""
    torch.manual_seed(0)
    codes, scales, zeros = rtn_quantize(torch.randn(64, 128, device=device), bits, 32, sym=False)
    if float_zeros:
        zeros = zeros + 0.375
    layer = QuantLinear.from_codes(codes, scales, zeros, bits=bits, group_size=32, float_zeros=float_zeros)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        ref = reference_weight(codes, scales.to(dtype), zeros.to(dtype), layer.g_idx)
        assert torch.equal(layer.dequantize_weight(dtype), ref), dtype


def test_autocast_dequantizes_in_its_dtype(device):
    """Under bf16 autocast the forward and the backward both multiply by W_hat de-quantized in bf16
    (not by a float32 W_hat cast down); the backward needs no saved tensor (dL/dx = dL/dy W_hat)."""
    torch.manual_seed(0)
    codes, scales, zeros = rtn_quantize(torch.randn(64, 128, device=device), 4, 32, sym=False)
    layer = QuantLinear.from_codes(codes, scales, zeros, bits=4, group_size=32, bias=torch.randn(64, device=device))
    w16 = layer.dequantize_weight(torch.bfloat16)
    x = torch.randn(3, 128, device=device, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.dtype) or t, lambda t: t):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            y = layer(x)
    assert y.dtype == torch.bfloat16 and saved == []
    assert torch.equal(y, torch.matmul(x.to(torch.bfloat16), w16.t()) + layer.bias.to(torch.bfloat16))
    dy = torch.randn(3, 64, device=device, dtype=torch.bfloat16)
    y.backward(dy)
    assert x.grad.dtype == torch.float32
    assert torch.equal(x.grad, torch.matmul(dy, w16).float())


def test_float_zeros(device):
    torch.manual_seed(0)
    codes, scales, zeros = rtn_quantize(torch.randn(32, 64, device=device), 4, 32, False)
    with pytest.raises(ValueError):
        QuantLinear.from_codes(codes, scales, zeros + 0.25, bits=4, group_size=32)
    fl = QuantLinear.from_codes(codes, scales, zeros + 0.25, bits=4, group_size=32, float_zeros=True)
    assert "qzeros" not in fl.state_dict() and fl.fzeros.dtype == torch.float32
    torch.testing.assert_close(fl.zero_points(), zeros + 0.25)

    layer = QuantLinear.from_codes(codes, scales, zeros, bits=4, group_size=32)
    new = zeros - 0.3
    layer.set_float_zeros(new)
    assert layer.float_zeros and "qzeros" not in layer.state_dict() and "fzeros" in layer.state_dict()
    torch.testing.assert_close(layer.dequantize_weight(), reference_weight(codes, scales, new, layer.g_idx))
    assert "float_zeros=True" in repr(layer)
    with pytest.raises(ValueError):
        layer.set_float_zeros(new.t())
    layer.to(torch.bfloat16)  # casts scales, but float zero points keep float32 precision
    assert layer.scales.dtype == torch.bfloat16 and layer.fzeros.dtype == torch.float32
    torch.testing.assert_close(layer.zero_points(), new)


def test_nbytes_and_repr():
    codes, scales, zeros = rtn_quantize(torch.randn(64, 128), 4, 32, False)
    layer = QuantLinear.from_codes(codes, scales.half(), zeros, bits=4)
    expected = 128 * 64 // 2 + 4 * 64 // 2 + 4 * 64 * 2 + 128 * 4  # qweight, qzeros, scales, g_idx
    assert layer.nbytes() == expected
    assert quantized_nbytes(nn.Sequential(layer)) == expected
    assert "bits=4" in repr(layer) and "group_size=32" in repr(layer)


def test_invalid_shapes():
    with pytest.raises(ValueError):
        QuantLinear(100, 64, 4, 32)  # group size must divide in_features
    with pytest.raises(ValueError):
        QuantLinear(64, 64, 5, 32)


def _random_layer(bits=4, group=32, in_f=128, out_f=64, act_order=False):
    from ptqlib.quant import QuantLinear, rtn_quantize

    torch.manual_seed(0)
    codes, scales, zeros = rtn_quantize(torch.randn(out_f, in_f), bits, group, sym=False)
    g_idx = torch.randperm(in_f) // group if act_order else None
    return QuantLinear.from_codes(codes, scales.float(), zeros, g_idx=g_idx, bits=bits)


@pytest.mark.parametrize("act_order", [False, True])
def test_inference_cache_follows_buffer_edits(act_order):
    layer = _random_layer(act_order=act_order)
    x = torch.randn(3, 128)
    with torch.no_grad():
        y0 = layer(x)
        assert torch.allclose(y0, x @ layer.dequantize_weight(torch.float32).t(), atol=1e-5)
        layer.scales.mul_(2)  # in place: the cached weight must not be reused
        assert torch.allclose(layer(x), 2 * y0, atol=1e-4)
        layer.set_float_zeros(layer.zero_points() + 0.5)
        assert torch.allclose(layer(x), x @ layer.dequantize_weight(torch.float32).t(), atol=1e-5)


def test_training_forward_saves_no_weight_and_matches_dense():
    layer = _random_layer()
    dense = layer.dequantize_weight(torch.float32).clone()
    x = torch.randn(5, 128, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        y = layer(x)
    assert all(s.numel() < dense.numel() for s in map(torch.Size, saved)), saved  # only x is kept
    assert getattr(layer, "_w_cache", None) is None
    (y ** 2).sum().backward()
    ((x_ref @ dense.t()) ** 2).sum().backward()
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-4)


def test_kept_dequantized_gives_the_same_gradients_once_per_layer_and_frees_after():
    """Kept across training calls: the same output and input gradient bit for bit, one de-quantization for two
    forward / backward passes (instead of four), the float size reported, nothing kept after the block."""
    from ptqlib.quant.qlinear import kept_dequantized

    layer, x = _random_layer(), torch.randn(5, 128)
    model = nn.Sequential(layer)
    calls = []
    real = layer.dequantize_weight_t

    def counted(dtype=None):
        calls.append(dtype)
        return real(dtype)

    layer.dequantize_weight_t = counted
    outs = []
    for keep in (False, True):
        calls.clear()
        with kept_dequantized(model, keep) as held:
            grads = []
            for _ in range(2):
                xi = x.clone().requires_grad_(True)
                y = layer(xi)
                (y ** 2).sum().backward()
                grads.append((y.detach(), xi.grad))
        outs.append(grads)
        assert len(calls) == (1 if keep else 4)
        assert held == [layer.in_features * layer.out_features * 4 if keep else 0]
        assert getattr(layer, "_w_cache", None) is None and not layer.keep_in_training
    for (y0, g0), (y1, g1) in zip(*outs):
        assert torch.equal(y0, y1) and torch.equal(g0, g1)


@pytest.mark.parametrize("permuted", [False, True])
def test_fold_group_offset_adds_a_constant_per_row_and_group(permuted, device):
    """W' = W + D[o, g_idx[i]] with codes and scales untouched: the QA-LoRA merge's one operation."""
    torch.manual_seed(0)
    w = torch.randn(48, 128, device=device)
    codes, scales, zeros = rtn_quantize(w, 4, 32, sym=False)
    g_idx = (torch.arange(128, device=device) // 32)
    if permuted:
        g_idx = g_idx[torch.randperm(128, device=device)]
    layer = QuantLinear.from_codes(codes, scales.float(), zeros, g_idx=g_idx, bits=4, group_size=32)
    before = layer.dequantize_weight(torch.float32).clone()
    D = torch.randn(48, 4, device=device) * 0.01
    merged = layer.fold_group_offset(D)
    assert torch.allclose(merged.dequantize_weight(torch.float32), before + D[:, g_idx.long()], atol=1e-6)
    assert torch.equal(merged.unpack_codes(), layer.unpack_codes()) and torch.equal(merged.scales, layer.scales)
    assert merged.float_zeros and not layer.float_zeros  # a copy; the layer itself is unchanged
    assert torch.equal(layer.dequantize_weight(torch.float32), before)
    with pytest.raises(ValueError, match=r"D must be \(out, G\) = \(48, 4\), got \(48, 3\)"):
        layer.fold_group_offset(D[:, :3])
    layer.scales[0, 0] = 0  # a constant group: nothing can be added to its weights through the zero
    with pytest.raises(ValueError, match="scale 0"):
        layer.fold_group_offset(D)
    assert layer.fold_group_offset(torch.where(torch.arange(4, device=device) == 0, 0.0, D)).float_zeros

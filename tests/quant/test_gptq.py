import pytest
import torch
from torch import nn

from ptqlib.quant import QuantLinear, find_linear_layers, gptq_quantize_model, load_quantized, save_quantized
from ptqlib.quant.gptq import GPTQ, relative_output_error
from ptqlib.quant.rtn import quantlinear_from_linear
from ptqlib.quant.uniform import rtn_quantize

BITS = [2, 3, 4, 8]
GROUPS = [-1, 32, 64]


def _linear(device, out_f=64, in_f=128, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=False).to(device)


def _correlated_inputs(device, n=1024, in_f=128, rank=12, seed=1):
    """Inputs on a low-dimensional subspace plus a little noise: H is far from diagonal."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, rank, generator=g)
    mix = torch.randn(rank, in_f, generator=g)
    return (z @ mix + 0.05 * torch.randn(n, in_f, generator=g)).to(device)


def _dequant(res, dtype=torch.float32):
    gi = res.g_idx.long()
    return res.scales[:, gi] * (res.codes.to(dtype) - res.zeros[:, gi])


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("act_order", [False, True])
def test_identity_hessian_gives_rtn(bits, group_size, act_order, device):
    lin = _linear(device)
    gq = GPTQ(lin)
    gq.H = torch.eye(128, device=device)
    res = gq.quantize(bits, group_size, sym=False, act_order=act_order)
    codes, scales, zeros = rtn_quantize(lin.weight, bits, group_size, sym=False)
    assert torch.equal(res.codes, codes)
    assert torch.equal(res.scales, scales) and torch.equal(res.zeros, zeros)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", GROUPS)
def test_gptq_beats_rtn_on_correlated_inputs(bits, group_size, device):
    lin = _linear(device)
    x = _correlated_inputs(device)
    gq = GPTQ(lin)
    gq.add_batch(x[:500])
    gq.add_batch(x[500:].unsqueeze(0))  # any leading shape; running mean over all tokens
    torch.testing.assert_close(gq.H, 2 / len(x) * x.T @ x, rtol=1e-4, atol=1e-3)
    res = gq.quantize(bits, group_size)
    W = lin.weight.detach()
    c, s, z = rtn_quantize(W, bits, group_size, sym=False)
    w_rtn = s[:, res.g_idx.long()] * (c - z[:, res.g_idx.long()])

    def err(wh):  # ||X W^T - X W_hat^T||^2 / ||X W^T||^2 computed on the data itself
        return float((x @ (W - wh).T).pow(2).sum() / (x @ W.T).pow(2).sum())

    e_gptq, e_rtn = err(_dequant(res)), err(w_rtn)
    assert e_gptq < e_rtn
    assert relative_output_error(W, _dequant(res), gq.H) == pytest.approx(e_gptq, rel=1e-3)


@pytest.mark.parametrize("static_groups", [True, False])
def test_act_order_g_idx_consistent(static_groups, device):
    lin = _linear(device)
    x = _correlated_inputs(device) * torch.linspace(0.1, 3, 128, device=device)  # distinct H_ii
    gq = GPTQ(lin)
    gq.add_batch(x)
    res = gq.quantize(4, 32, act_order=True, static_groups=static_groups)
    natural = torch.arange(128, device=device) // 32
    if static_groups:
        assert torch.equal(res.g_idx.long(), natural)  # no runtime reorder needed
    else:
        assert not torch.equal(res.g_idx.long(), natural)
        assert torch.equal(torch.bincount(res.g_idx.long()), torch.full((4,), 32, device=device))
    q = quantlinear_from_linear(lin, res.codes, res.scales, res.zeros, 4, 32, res.g_idx)
    w = q.dequantize_weight(torch.float32)
    # every weight equals scales[g_idx[i]] * (q - zeros[g_idx[i]]) for its own column's group
    assert torch.equal(w, _dequant(res))
    assert torch.equal(q.unpack_codes(), res.codes) and torch.equal(q.g_idx, res.g_idx)
    # codes are the exact grid points of the recorded groups: re-quantizing is the identity
    gi = res.g_idx.long()
    requant = torch.round(w / res.scales[:, gi]) + res.zeros[:, gi]
    assert torch.equal(requant.long(), res.codes)
    W = lin.weight.detach()
    c, s, z = rtn_quantize(W, 4, 32, sym=False)
    assert relative_output_error(W, w, gq.H) < relative_output_error(W, s[:, natural] * (c - z[:, natural]), gq.H)


def test_singular_hessian_does_not_crash(device):
    lin = _linear(device)
    x = torch.randn(40, 128, device=device)  # N < in: rank-deficient H
    x[:, :10] = 0  # dead inputs
    gq = GPTQ(lin)
    gq.add_batch(x)
    res = gq.quantize(4, 32, damp=0.0)  # undamped: Cholesky must fail and be retried
    assert res.info["dead_inputs"] == 10
    assert res.info["damp_retries"] >= 1 and res.info["damp"] > 0 and res.info["fallback"] is None
    assert torch.isfinite(res.scales).all()
    assert (_dequant(res)[:, :10] == 0).all()  # dead columns are dropped
    res = gq.quantize(4, 32)  # default damping copes with N < in without retries
    assert res.info["damp"] == 0.01 and torch.isfinite(_dequant(res)).all()

    gq.H[0, 0] = float("nan")  # hopeless H: falls back to RTN for the layer, still no crash
    res = gq.quantize(4, 32)
    assert res.info["fallback"] == "rtn" and torch.isfinite(_dequant(res)).all()


def test_gptq_quantize_model_tiny(tiny_model, device, tmp_path):
    model = tiny_model.to(device)
    torch.manual_seed(0)
    calib = [torch.randint(0, 1024, (1, 32)) for _ in range(4)]
    x = torch.randint(0, 1024, (1, 16), device=device)
    stats = gptq_quantize_model(model, calib, bits=4, group_size=32, act_order=True, progress=False)
    assert not find_linear_layers(model)  # no nn.Linear left in the decoder
    qlayers = find_linear_layers(model, (QuantLinear,))
    assert len(qlayers) == 14 and isinstance(model.lm_head, nn.Linear)
    assert stats["n_layers"] == 14 and set(stats["layers"]) == set(qlayers)
    one = stats["layers"]["model.layers.1.mlp.down_proj"]
    assert {"gptq_rel_err", "rtn_rel_err", "time_s", "damp", "damp_retries"} <= set(one)
    assert one["n_samples"] == 4 * 32
    assert stats["mean_gptq_rel_err"] < stats["mean_rtn_rel_err"]
    with torch.no_grad():
        logits = model(x).logits
    assert torch.isfinite(logits).all()
    save_quantized(model, tmp_path)  # an act-order GPTQ model round-trips through the checkpoint
    loaded = load_quantized(tmp_path, device=device)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, logits)


def test_gptq_diagnostics_off_gives_the_same_model(tiny_model):
    """The per-linear error diagnostics only observe: turning them off changes no code."""
    import copy

    torch.manual_seed(0)
    calib = [torch.randint(0, 1024, (1, 32)) for _ in range(3)]
    with_diag, without = tiny_model, copy.deepcopy(tiny_model)
    st_on = gptq_quantize_model(with_diag, calib, bits=3, group_size=32, progress=False)
    st_off = gptq_quantize_model(without, calib, bits=3, group_size=32, progress=False, diagnostics=False)
    assert st_on["diagnostics_s"] > 0 and st_off["diagnostics_s"] == 0
    assert st_off["mean_gptq_rel_err"] is None and "gptq_rel_err" not in st_off["layers"]["model.layers.0.mlp.up_proj"]
    a, b = with_diag.state_dict(), without.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_gptq_model_rejects_bad_group_size(tiny_model):
    with pytest.raises(ValueError):
        gptq_quantize_model(tiny_model, [torch.randint(0, 1024, (1, 8))], group_size=96, progress=False)
    assert not find_linear_layers(tiny_model, (QuantLinear,))  # untouched


@pytest.mark.parametrize("act_order", [False, True])
def test_one_loop_over_stacked_linears_equals_one_loop_each(act_order):
    """Linears that read one input, quantized as one stack of rows (the bf16 path) get the codes
    each gets alone: GPTQ's rows are independent given H. Only the lazy block update's matmul
    may round differently with more rows, so nearly every code must agree and the error match."""
    from ptqlib.quant.gptq_model import _Stack

    x = _correlated_inputs("cpu")
    lins = [_linear("cpu", out_f=o, seed=s) for o, s in ((64, 0), (32, 1), (96, 2))]
    alone = []
    for lin in lins:
        gq = GPTQ(lin)
        gq.add_batch(x)
        alone.append(gq.quantize(4, 32, act_order=act_order))
    st = _Stack(lins)
    whole = GPTQ(st)
    whole.add_batch(x)
    parts = st.split(whole.quantize(4, 32, act_order=act_order))
    H = whole.H
    for lin, a, b in zip(lins, alone, parts):
        assert b.codes.shape == lin.weight.shape and b.scales.shape == a.scales.shape
        assert (a.codes == b.codes).float().mean() > 0.999
        assert torch.equal(a.g_idx, b.g_idx)
        ea, eb = (relative_output_error(lin.weight, _dequant(r), H) for r in (a, b))
        assert abs(ea - eb) <= 1e-3 * ea


def test_bf16_calibration_batches_and_stacks_and_keeps_the_error(tiny_model, monkeypatch):
    """precision bf16 batches the calibration windows and stacks q/k/v and up/gate; the model's
    output error on its calibration stays within 5% of the fp32 path's, which is unchanged."""
    import copy

    from ptqlib import precision

    monkeypatch.setenv(precision.FORCE_ENV, "1")
    torch.manual_seed(0)
    calib = [torch.randint(0, 1024, (1, 32)) for _ in range(6)]
    st = {}
    for prec in ("fp32", "bf16"):
        st[prec] = gptq_quantize_model(copy.deepcopy(tiny_model), calib, bits=4, group_size=32, progress=False,
                                       precision=prec)
    a, b = st["fp32"]["mean_gptq_rel_err"], st["bf16"]["mean_gptq_rel_err"]
    assert abs(b / a - 1) < 0.05, (a, b)
    assert st["bf16"]["layers"]["model.layers.0.self_attn.k_proj"]["n_samples"] == 6 * 32

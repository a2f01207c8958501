"""The compiled quantizer kernels give the eager path's numbers bit for bit (so the choice stays out of
stage ids), and a compiler that fails falls back to eager with one warning, or is an error where asked for."""
from __future__ import annotations

import warnings

import pytest
import torch

from ptqlib.adapters import l4q, qat_lora, quantizer_kernels
from ptqlib.adapters.l4q import apply_l4q
from ptqlib.adapters.qat_lora import apply_qat_lora
from ptqlib.study.kinds import id_params
from ptqlib.tiny import build_tiny_model

SHAPES = [(64, 128, 32), (96, 64, 16), (128, 96, 32)]  # (out, in, group): square, wide and tall layers


@pytest.fixture(autouse=True)
def _needs_a_compiler(request):
    """The compiled path needs torch.compile's C++ toolchain (gcc and Python headers, present on the project's
    machines); where it is missing these comparisons cannot run, and the fallback test below still does."""
    if request.node.name.startswith(("test_a_failing_compiler", "test_the_kernel")) or \
            "forward" in quantizer_kernels._compiled:
        return
    try:
        quantizer_kernels._compile()
    except Exception as e:  # noqa: BLE001 -- the reason is the skip message
        pytest.skip(f"torch.compile does not work here: {type(e).__name__}: {str(e).splitlines()[0]}")


def _layer(out_f: int, in_f: int, g: int, bits: int, kernel: str, seed: int = 0) -> l4q.L4QLinear:
    torch.manual_seed(seed)
    base = torch.nn.Linear(in_f, out_f, bias=False)
    layer = l4q.L4QLinear(base, bits=bits, group_size=g, rank=4, alpha=8.0, quantizer_kernel=kernel)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.05)  # a non-zero update, so the codes move off the init grid
        layer.q_offset.normal_(0, 1e-3)  # and an offset, so both masks (inside / clipped) are hit
    return layer


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", SHAPES)
def test_l4q_layer_forward_and_backward_are_bit_identical(shape, bits):
    out_f, in_f, g = shape
    results = {}
    for kernel in ("eager", "compiled"):
        layer = _layer(out_f, in_f, g, bits, kernel)
        x = torch.randn(3, 5, in_f, generator=torch.Generator().manual_seed(1), requires_grad=True)
        y = layer(x)
        y.pow(2).sum().backward()
        results[kernel] = [y.detach(), x.grad] + [p.grad for p in (layer.lora_A, layer.lora_B, layer.q_scale,
                                                                   layer.q_offset)]
    clipped = (results["eager"][5] != 0).any()  # dL/db is non-zero only where weights clip
    assert clipped, "the setting must clip some weights, or the clamp mask goes untested"
    for a, b in zip(results["eager"], results["compiled"]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bits", [3, 4])
def test_qat_lora_fake_quantizer_is_bit_identical(bits):
    grads = {}
    for kernel in ("eager", "compiled"):
        torch.manual_seed(0)
        W = torch.randn(64, 128) * 0.05
        S, b = l4q.l4q_init(W, bits, 32)
        S = (S * 0.8).requires_grad_()  # a narrower grid than the init: some weights clip
        b = torch.full_like(S, 1e-3).requires_grad_()
        Wq = qat_lora.FakeQuantFunction.apply(W, S, b, *l4q.signed_range(bits), 1.0, kernel)
        (Wq * torch.linspace(-1, 1, Wq.numel()).view_as(Wq)).sum().backward()
        grads[kernel] = (Wq.detach(), S.grad, b.grad)
    for a, b_ in zip(grads["eager"], grads["compiled"]):
        assert torch.equal(a, b_)


def _train(apply, kernel: str) -> dict[str, torch.Tensor]:
    """Three Adam steps of a tiny model wrapped by ``apply``: every trainable tensor after them."""
    torch.manual_seed(0)
    model = apply(build_tiny_model(seed=0), bits=3, group_size=16, rank=4, alpha=8.0, quantizer_kernel=kernel)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(2))
    for _ in range(3):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("apply", [apply_l4q, apply_qat_lora], ids=["l4q", "qat_lora"])
def test_training_gives_the_same_weights_with_either_kernel(apply):
    eager, fused = _train(apply, "eager"), _train(apply, "compiled")
    assert eager.keys() == fused.keys() and eager
    for name in eager:
        assert torch.equal(eager[name], fused[name]), name


def test_the_kernel_stays_out_of_the_stage_id():
    base = {"method": "l4q", "bits": 4, "lr": 1e-3}
    ids = {k: id_params("finetune", {**base, "quantizer_kernel": k}) for k in quantizer_kernels.KERNELS}
    assert len({repr(sorted(v.items())) for v in ids.values()}) == 1
    assert "quantizer_kernel" not in ids["auto"]


def test_a_failing_compiler_falls_back_with_one_warning_or_is_an_error_where_asked(monkeypatch):
    def broken():
        raise RuntimeError("no C++ compiler found\nmore detail")

    monkeypatch.setattr(quantizer_kernels, "_compiled", {})
    monkeypatch.setattr(quantizer_kernels, "_compile", broken)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler found.*runs eager"):
        assert quantizer_kernels.compiled("auto") is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: the second call is silent
        assert quantizer_kernels.compiled("auto") is None
    with pytest.raises(RuntimeError, match="quantizer_kernel compiled: .*no C\\+\\+ compiler found"):
        quantizer_kernels.compiled("compiled")
    with pytest.raises(ValueError, match="quantizer_kernel: 'fast' is not valid; valid: auto, compiled, eager"):
        quantizer_kernels.compiled("fast")
    # the layer still trains on the eager path
    layer = _layer(32, 64, 16, 4, "auto")
    layer(torch.randn(2, 64)).sum().backward()
    assert layer.lora_A.grad is not None

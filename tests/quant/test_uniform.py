import pytest
import torch

from ptqlib.quant.grid import n_groups
from ptqlib.quant.uniform import dequantize, find_params, quantize, rtn_quantize

BITS = [2, 3, 4, 8]


@pytest.mark.parametrize("bits", BITS)
def test_asym_grid_covers_range(bits):
    torch.manual_seed(0)
    w = torch.randn(16, 64) + 0.3
    scale, zero = find_params(w, bits, sym=False)
    assert scale.shape == zero.shape == (16, 1)
    assert torch.equal(zero, zero.round()) and zero.min() >= 0 and zero.max() <= 2**bits - 1
    q = quantize(w, scale, zero, bits)
    assert q.dtype == torch.long and q.min() >= 0 and q.max() <= 2**bits - 1
    # every weight lies inside the grid's range, so the error is at most half a step
    err = (dequantize(q, scale, zero) - w).abs()
    assert (err <= scale / 2 + 1e-6).all()


@pytest.mark.parametrize("bits", BITS)
def test_sym_grid_max(bits):
    torch.manual_seed(0)
    w = torch.randn(8, 32)
    scale, zero = find_params(w, bits, sym=True, sym_grid="max")
    assert (zero == 2 ** (bits - 1)).all()
    amax = w.abs().amax(1, keepdim=True)
    torch.testing.assert_close(scale, amax / (2 ** (bits - 1) - 1))
    wh = dequantize(quantize(w, scale, zero, bits), scale, zero)
    # +-max|w| are exactly on the grid
    i = w.abs().argmax(1, keepdim=True)
    torch.testing.assert_close(wh.gather(1, i), w.gather(1, i))


@pytest.mark.parametrize("bits", BITS)
def test_sym_grid_full_uses_every_code(bits):
    """The reference's symmetric grid: scale 2 max|w| / (2^b - 1), every weight within half a step."""
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    scale, zero = find_params(w, bits, sym=True)  # "full" is the default
    assert (zero == 2 ** (bits - 1)).all()
    torch.testing.assert_close(scale, 2 * w.abs().amax(1, keepdim=True) / (2**bits - 1))
    q = quantize(w, scale, zero, bits)
    assert q.min() == 0 and q.max() == 2**bits - 1  # both ends of the code range are used
    assert ((dequantize(q, scale, zero) - w).abs() <= scale / 2 + 1e-6).all()


def test_sym_grid_rejects_unknown_rule():
    with pytest.raises(ValueError, match="sym_grid must be one of .*'half'"):
        find_params(torch.randn(2, 8), 4, sym=True, sym_grid="half")


@pytest.mark.parametrize("bits", BITS)
def test_asym_zero_point_is_never_zero(bits):
    """Non-negative groups (and those negative by less than half a step) get zero 1, not 0:
    the v1 checkpoint layout stores zero - 1 and its readers cannot read back a zero of 0."""
    torch.manual_seed(0)
    w = torch.rand(6, 64)  # all >= 0
    w[1, 0] = -1e-4  # negative by far less than half a step
    w[2, :] = -torch.rand(64)  # all <= 0: zero at the top of the range
    w[3, :] = torch.randn(64)  # both signs: the reference rule round(-min / scale) applies
    scale, zero = find_params(w, bits, sym=False)
    assert zero.min() >= 1 and zero.max() <= 2**bits - 1
    q = quantize(w, scale, zero, bits)
    # still within half a step everywhere, and max(w) of a non-negative row exactly on the grid
    assert ((dequantize(q, scale, zero) - w).abs() <= scale / 2 + 1e-6).all()
    torch.testing.assert_close(dequantize(q, scale, zero)[0].max(), w[0].max())
    assert zero[3, 0] == torch.round(-w[3].min() / ((w[3].max() - w[3].min()) / (2**bits - 1)))
    assert zero[2, 0] == 2**bits - 1


@pytest.mark.parametrize("sym", [False, True])
def test_all_zero_rows_are_safe(sym):
    w = torch.zeros(4, 32)
    w[1] = torch.randn(32)
    scale, zero = find_params(w, 4, sym)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    wh = dequantize(quantize(w, scale, zero, 4), scale, zero)
    assert (wh[[0, 2, 3]] == 0).all()


@pytest.mark.parametrize("group_size", [-1, 32, 64])
@pytest.mark.parametrize("sym", [False, True])
def test_rtn_quantize_groups(group_size, sym):
    torch.manual_seed(1)
    w = torch.randn(24, 128, dtype=torch.float16)
    codes, scales, zeros = rtn_quantize(w, 4, group_size, sym)
    G = n_groups(128, group_size)
    assert codes.shape == (24, 128) and scales.shape == zeros.shape == (24, G)
    g = 128 // G
    for j in range(G):  # each group is its own per-row grid
        s, z = find_params(w[:, j * g:(j + 1) * g], 4, sym)
        torch.testing.assert_close(scales[:, j:j + 1], s)
        assert torch.equal(zeros[:, j:j + 1], z)
        assert torch.equal(codes[:, j * g:(j + 1) * g], quantize(w[:, j * g:(j + 1) * g], s, z, 4))


def test_rejects_bad_settings():
    with pytest.raises(ValueError):
        find_params(torch.randn(2, 8), 5, False)
    with pytest.raises(ValueError):
        rtn_quantize(torch.randn(2, 96), 4, 64, False)


def test_grid_rules_are_stated_once():
    """The bit widths and group rules of every quantizer come from ptqlib.quant.grid."""
    from ptqlib.methods import finetune_methods, quantize_methods
    from ptqlib.quant import grid

    q, f = quantize_methods(), finetune_methods()
    assert q["gptq"].bits is q["rtn"].bits is f["l4q"].bits is f["qat_lora"].bits is grid.SUPPORTED_BITS
    assert grid.effective_group_size(576, -1) == 576 and grid.effective_group_size(576, 64) == 64
    with pytest.raises(ValueError, match="positive divisor of in_features=576, got 128"):
        grid.effective_group_size(576, 128)
    assert grid.signed_range(3) == (-4, 3)
    with pytest.raises(ValueError, match=r"bits must be one of \(2, 3, 4, 8\), got 5"):
        grid.signed_range(5)


def test_study_validation_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, ptqlib.study.schema; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0

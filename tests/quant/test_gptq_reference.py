"""ptqlib's GPTQ gives the GPTQ reference's codes (IST-DASLab/gptq) on fixed layers.

The fixture holds a 96 x 256 layer, its Hessian and the reference's de-quantized weight in each
setting; bench/gptq_reference_fixture.py wrote it with the reference's own ``fasterquant``.
"""
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from ptqlib.quant.gptq import GPTQ, relative_output_error

FIXTURE = Path(__file__).parent / "data" / "gptq_reference.safetensors"


def _load():
    with safe_open(str(FIXTURE), "pt") as f:
        settings = json.loads(f.metadata()["settings"])
        return {k: f.get_tensor(k) for k in f.keys()}, settings


TENSORS, SETTINGS = _load()


def _ours(bits, g, sym, act_order, static, group_grid="lazy", sym_grid="full"):
    W, H = TENSORS["W"], TENSORS["H"]
    lin = nn.Linear(W.shape[1], W.shape[0], bias=False)
    lin.weight.data = W.clone()
    gq = GPTQ(lin)
    gq.H, gq.nsamples = H.clone(), 2048
    res = gq.quantize(bits, g, sym, act_order, static, damp=0.01, block_size=128,
                      group_grid=group_grid, sym_grid=sym_grid)
    gi = res.g_idx.long()
    return res.scales[:, gi] * (res.codes.float() - res.zeros[:, gi]), res


@pytest.mark.parametrize("setting", SETTINGS, ids=[s[0] for s in SETTINGS])
def test_codes_equal_the_reference(setting):
    name, bits, g, sym, act_order, static = setting
    ref = TENSORS[name]
    ours, res = _ours(bits, g, sym, act_order, static)
    # the reference returns W_hat only: its codes on our grid (equal to the reference's grid up to
    # float rounding, since both come from the same numbers)
    gi = res.g_idx.long()
    scale, zero = res.scales[:, gi], res.zeros[:, gi]
    ref_codes = torch.round(ref / scale + zero).long()
    # exact with the fixture's thread count; other BLAS summation orders may flip a rare code
    assert (res.codes == ref_codes).float().mean() >= 0.999, \
        f"{name}: {(res.codes != ref_codes).float().mean():.2%} of the codes differ"
    # where the codes agree, the grids agree too: W_hat equal up to float rounding of the scales
    same = res.codes == ref_codes
    assert ((ours - ref).abs()[same] <= 1e-4 * scale[same]).all()


@pytest.mark.parametrize("name", ["b2_g64_asym", "b4_g64_asym", "b4_g64_sym"])
def test_old_rules_differ_from_the_reference(name):
    """The fixture discriminates: ptqlib's former rules give other codes at g64."""
    _, bits, g, sym, act_order, static = next(s for s in SETTINGS if s[0] == name)
    ref = TENSORS[name]
    if sym:  # the max|w| / (2^(b-1) - 1) grid, with the reference's group rule
        old, res = _ours(bits, g, sym, act_order, static, sym_grid="max")
    else:  # grids from the error-updated block copy
        old, res = _ours(bits, g, sym, act_order, static, group_grid="updated")
    assert ((old - ref).abs() > 1e-4 * float(res.scales.min())).float().mean() > 0.2
    # ...and the reference's output error is no worse than the old rules' (what made us switch)
    W, H = TENSORS["W"], TENSORS["H"]
    assert relative_output_error(W, ref, H) <= relative_output_error(W, old, H) * 1.05


def test_group_grid_is_validated():
    with pytest.raises(ValueError, match="group_grid must be one of .*'fresh'"):
        _ours(4, 64, False, False, False, group_grid="fresh")

"""HQQ through the hqq library: the codes, scales and zero points are the library's, loaded into
QuantLinear so that the de-quantized weight is the library's bit for bit; bad settings are refused."""
import pytest
import torch

pytest.importorskip("hqq")

from hqq.core.quantize import BaseQuantizeConfig, Quantizer  # noqa: E402

from ptqlib import artifacts  # noqa: E402
from ptqlib.errors import ConfigError  # noqa: E402
from ptqlib.quant.qlinear import QuantLinear  # noqa: E402
from ptqlib.stages import quantize as ptq  # noqa: E402
from ptqlib.study.params import QuantizeParams  # noqa: E402
from ptqlib.study.schema import load_study  # noqa: E402


@pytest.mark.parametrize("bits, group_size", [(4, 32), (3, 32), (2, 64), (8, 64)])
def test_the_dequantized_weights_are_the_librarys(tmp_path, bits, group_size):
    float_model, _, _ = artifacts.load("tiny", "cpu")
    weights = {n: m.weight.detach().clone() for n, m in float_model.named_modules() if isinstance(m, torch.nn.Linear)
               and n != "lm_head"}
    p = QuantizeParams(method="hqq", bits=bits, group_size=group_size).__dict__
    model, tok, stats = ptq.quantize("tiny", p)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert set(layers) == set(weights) and stats["n_layers"] == len(layers)
    # the library on its own, as its users call it (BaseQuantizeConfig: its defaults for the bit width)
    cfg = BaseQuantizeConfig(nbits=bits, group_size=group_size, axis=1)["weight_quant_params"]
    for name, layer in layers.items():
        W_q, meta = Quantizer.quantize(weights[name].float(), **cfg, bitpack=False, device="cpu",
                                       compute_dtype=torch.float32)
        meta["compute_dtype"] = torch.float32
        assert torch.equal(layer.dequantize_weight(torch.float32), Quantizer.dequantize(W_q, meta)), name
        assert layer.float_zeros and layer.bits == bits
    # it round-trips through the checkpoint (float zero points) and keeps the weights
    ptq.save(model, tok, p, tmp_path / "hqq", "tiny")
    loaded, _, _ = artifacts.load(tmp_path / "hqq", "cpu")
    for name, layer in {n: m for n, m in loaded.named_modules() if isinstance(m, QuantLinear)}.items():
        assert torch.equal(layer.dequantize_weight(torch.float32), layers[name].dequantize_weight(torch.float32))


def test_optimize_false_is_the_min_max_grid_and_is_worse():
    from ptqlib.methods.hqq import hqq_codes

    torch.manual_seed(0)
    w = torch.randn(64, 128) * torch.rand(64, 1)
    errs = {}
    for optimize in (True, False):
        codes, s, z, _ = hqq_codes(w, 4, 32, optimize)
        w_hat = QuantLinear.from_codes(codes, s, z, bits=4, group_size=32, float_zeros=True).dequantize_weight(torch.float32)
        errs[optimize] = float((w - w_hat).abs().pow(0.7).sum())  # the solver's objective (p = 0.7)
    assert errs[True] < errs[False]


@pytest.mark.parametrize("stage, error", [
    ("{method: hqq, group_size: 48}", r"group_size: 48 does not divide the input size"),
    ("{method: hqq, bits: 1}", r"bits: 1 is not supported by method 'hqq'; valid: 2, 3, 4, 8"),
    ("{method: gptq, optimize: false}", r"optimize: False has no effect on method 'gptq'; it applies to hqq only"),
])
def test_bad_settings_are_refused_before_anything_runs(tmp_path, stage, error):
    f = tmp_path / "s.yaml"
    f.write_text(f"model: tiny\npipelines:\n  a: [{{quantize: {stage}}}]\n")
    with pytest.raises(ConfigError, match=error):
        load_study(f)

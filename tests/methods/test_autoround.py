"""AutoRound and AWQ through the auto-round library: ptqlib's model holds the library's own codes
(equal to what the library's GPTQ-format export packs) and computes what the library's tuned model
computes (AWQ's folded norms included); bad settings are refused before anything runs."""
import pytest
import torch

pytest.importorskip("auto_round")

from auto_round import AutoRound  # noqa: E402
from auto_round.algorithms.quantization.rtn.config import RTNConfig  # noqa: E402
from auto_round.algorithms.transforms.awq.config import AWQConfig  # noqa: E402

from ptqlib import artifacts  # noqa: E402
from ptqlib.errors import ConfigError  # noqa: E402
from ptqlib.quant.checkpoint import load_quantized  # noqa: E402
from ptqlib.quant.qlinear import QuantLinear  # noqa: E402
from ptqlib.stages import quantize as ptq  # noqa: E402
from ptqlib.study.params import QuantizeParams  # noqa: E402
from ptqlib.study.schema import load_study  # noqa: E402

GRID = dict(bits=4, group_size=32, sym=False)


def _library_run(method, calib, tmp_path):
    """The library as its users call it, on the same model, windows and seed -> (tuned model, export)."""
    model, tok, _ = artifacts.load("tiny", "cpu")
    common = dict(tokenizer=tok, nsamples=len(calib), seqlen=calib.shape[1], dataset=[c.reshape(1, -1) for c in calib],
                  device_map="cpu", enable_torch_compile=False, amp=False, seed=0, batch_size=len(calib))
    if method == "autoround":
        ar = AutoRound(model, scheme="W4A16", iters=3, **GRID, **common)
    else:
        ar = AutoRound(model, alg_configs=[AWQConfig(**GRID, apply_clip=True, n_grid=20), RTNConfig(**GRID)], **common)
    tuned, _ = ar.quantize()
    x = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = tuned(x).logits  # the library's fake-quantized model (de-quantized weights, folded norms)
    ar.save_quantized(str(tmp_path / "lib"), format="auto_gptq")
    return x, logits, load_quantized(tmp_path / "lib")


@pytest.mark.parametrize("method, extra", [("autoround", {"iters": 3, "batch_size": 4}), ("awq", {})])
def test_the_codes_and_the_model_are_the_librarys(tmp_path, method, extra):
    p = QuantizeParams(method=method, **GRID, calib_samples=4, calib_seq_len=64, calib_seed=0, **extra).__dict__
    calib = ptq.calibration_windows("tiny", p)
    ours, tok, stats = ptq.quantize("tiny", p, calib)
    x, lib_logits, exported = _library_run(method, calib, tmp_path)
    lib = {n: m for n, m in exported.named_modules() if isinstance(m, QuantLinear)}
    mine = {n: m for n, m in ours.named_modules() if isinstance(m, QuantLinear)}
    assert set(mine) == set(lib) and len(mine) == 14
    for n, layer in mine.items():  # the very codes the library packs into its GPTQ export
        assert torch.equal(layer.qweight, lib[n].qweight) and torch.equal(layer.qzeros, lib[n].qzeros), n
        assert torch.equal(layer.dequantize_weight(torch.float32), lib[n].dequantize_weight(torch.float32)), n
    with torch.no_grad():
        assert torch.allclose(ours(x).logits, lib_logits, atol=1e-5)  # computes what was tuned
    ptq.save(ours, tok, p, tmp_path / "ours", "tiny")  # and keeps it through ptqlib's checkpoint
    reloaded, _, _ = artifacts.load(tmp_path / "ours", "cpu")
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, ours(x).logits)
    assert stats["precision"] == "fp32" and stats["n_layers"] == 14


def test_a_symmetric_grid_reads_the_librarys_single_zero_point():
    # the library keeps one number (maxq) as a symmetric grid's zero point, not a tensor
    p = QuantizeParams(method="autoround", bits=4, group_size=32, sym=True, calib_samples=2, calib_seq_len=32,
                       calib_seed=0, iters=2, batch_size=2).__dict__
    model, _, _ = ptq.quantize("tiny", p, ptq.calibration_windows("tiny", p))
    layer = next(m for m in model.modules() if isinstance(m, QuantLinear))
    assert torch.equal(layer.zero_points(), torch.full_like(layer.zero_points(), 8))


def test_they_tune_in_fp32_so_precision_is_not_in_their_ids():
    from ptqlib.study.kinds import id_params

    for method in ("awq", "autoround"):
        p = QuantizeParams(method=method, precision="fp32").__dict__
        assert "precision" not in id_params("quantize", {**p, "precision": "bf16"})
    assert "precision" in id_params("quantize", {**QuantizeParams(method="gptq").__dict__, "precision": "bf16"})


def test_awq_folds_its_scales_into_the_norms():
    p = QuantizeParams(method="awq", **GRID, calib_samples=4, calib_seq_len=64, calib_seed=0).__dict__
    ours, _, _ = ptq.quantize("tiny", p, ptq.calibration_windows("tiny", p))
    float_model, _, _ = artifacts.load("tiny", "cpu")
    before = float_model.model.layers[0].input_layernorm.weight
    assert not torch.equal(ours.model.layers[0].input_layernorm.weight, before)


@pytest.mark.parametrize("stage, error", [
    ("{method: autoround, group_size: 48}", r"group_size: 48 does not divide the input size"),
    ("{method: autoround, iters: 0}", r"iters: 0 must be a positive integer"),
    ("{method: awq, n_grid: 0}", r"n_grid: 0 must be a positive integer"),
    ("{method: gptq, clip: false}", r"clip: False has no effect on method 'gptq'; it applies to awq only"),
    ("{method: nf4, sym: true}", r"sym: True has no effect on method 'nf4'; it applies to rtn, gptq, .*awq, autoround"),
])
def test_bad_settings_are_refused_before_anything_runs(tmp_path, stage, error):
    f = tmp_path / "s.yaml"
    f.write_text(f"model: tiny\npipelines:\n  a: [{{quantize: {stage}}}]\n")
    with pytest.raises(ConfigError, match=error):
        load_study(f)

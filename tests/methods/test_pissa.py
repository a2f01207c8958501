"""PiSSA and QPiSSA through peft: the adapter starts at each weight's principal part, the base is the residual
(its NF4 quantization for qpissa), and the stage saves that base with the adapter."""
import pytest
import torch

from ptqlib import artifacts
from ptqlib.stages import finetune
from ptqlib.study.params import FinetuneParams


def _params(method, **kw):
    return FinetuneParams(**{"method": method, "rank": 4, "alpha": 8.0, "steps": 1, **kw}).__dict__


def _lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def _dense(layer):
    from ptqlib.methods import dense_weight

    base = layer.get_base_layer()
    w = dense_weight(base)
    return (w if w is not None else base.weight).float()


def test_pissa_starts_at_the_principal_part_and_keeps_the_model():
    """W_res + s B A = W (the float model at step 0), s B A is the rank-r SVD of W: the residual is the rest."""
    model = finetune.prepare(artifacts.load("tiny", "cpu")[0], "pissa", _params("pissa"), "tiny")
    float_model = dict(artifacts.load("tiny", "cpu")[0].named_modules())
    layers = _lora_layers(model)
    assert len(layers) == 14
    for name, m in layers.items():
        W = float_model[name].weight.float()
        sBA = m.scaling["default"] * m.lora_B["default"].weight @ m.lora_A["default"].weight
        assert torch.allclose(_dense(m) + sBA, W, atol=1e-5), name
        S = torch.linalg.svdvals(W)
        assert torch.allclose(torch.linalg.svdvals(sBA)[:4], S[:4], rtol=1e-4), name


def test_qpissa_quantizes_the_residual_and_errs_less_than_nf4_of_the_weight():
    """The NF4 codes are the residual's: its error against W is smaller than NF4 of W itself (QPiSSA's point)."""
    from ptqlib.methods import dense_weight
    from ptqlib.stages import quantize as ptq
    from ptqlib.study.params import QuantizeParams

    model = finetune.prepare(artifacts.load("tiny", "cpu")[0], "qpissa", _params("qpissa"), "tiny")
    nf4, _, _ = ptq.quantize("tiny", QuantizeParams(method="nf4").__dict__)
    float_model = dict(artifacts.load("tiny", "cpu")[0].named_modules())
    nf4_layers = dict(nf4.named_modules())
    q_err = n_err = 0.0
    for name, m in _lora_layers(model).items():
        assert type(m.get_base_layer()).__name__ == "Linear4bit"
        W = float_model[name].weight.float()
        sBA = m.scaling["default"] * m.lora_B["default"].weight @ m.lora_A["default"].weight
        q_err += torch.linalg.norm(W - _dense(m) - sBA).item()
        n_err += torch.linalg.norm(W - dense_weight(nf4_layers[name]).float()).item()
    assert q_err < n_err  # 3.40 vs 3.61 on the random tiny model (a flat spectrum: a trained one gains more)


@pytest.mark.parametrize("method, merge", [("pissa", False), ("qpissa", False), ("pissa", True)])
def test_the_stage_saves_its_base_and_loads_back(tmp_path, method, merge):
    model = finetune.prepare(artifacts.load("tiny", "cpu")[0], method, _params(method, merge=merge), "tiny")
    x = torch.randint(0, 1024, (2, 16))
    with torch.no_grad():
        out = model(x).logits
    tok = artifacts.load("tiny", "cpu")[1]
    info = finetune.save(model, tok, method, _params(method, merge=merge), tmp_path / "run", "tiny")
    if merge:
        assert info["type"] == "hf"
    else:
        assert info["base"] == "base"
        assert artifacts.is_quantized(tmp_path / "run") == (method == "qpissa")
    loaded, _, _ = artifacts.load(tmp_path / "run", "cpu")
    with torch.no_grad():
        assert torch.allclose(loaded(x).logits, out, atol=1e-4)


@pytest.mark.parametrize("chain, error", [
    ("[{finetune: pissa}]", None),
    ("[{finetune: qpissa}]", None),
    ("[{quantize: nf4}, {finetune: pissa}]", "needs a float model but its input is quantized"),
    ("[{finetune: qpissa}, {quantize: rtn}]", "unmerged .qpissa. adapter"),
])
def test_study_validation(tmp_path, chain, error):
    from ptqlib.errors import ConfigError
    from ptqlib.study.schema import load_study

    f = tmp_path / "s.yaml"
    f.write_text(f"model: tiny\npipelines:\n  a: {chain}\n")
    if error is None:
        assert load_study(f).pipelines
    else:
        with pytest.raises(ConfigError, match=error):
            load_study(f)

"""Stage artifacts load back to the same model, whatever sits under an adapter."""
import torch

from ptqlib import artifacts
from ptqlib.stages import finetune
from ptqlib.study.params import FinetuneParams


def _params(method, **kw):
    return FinetuneParams(method=method, rank=4, alpha=8.0, steps=1, **kw).__dict__


def test_lora_on_a_model_name_round_trips(tmp_path):
    model, tok, _ = artifacts.load("tiny", "cpu")
    model = finetune.prepare(model, "lora", _params("lora"))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)  # as after training: the adapter changes the output
    x = torch.randint(0, 1024, (1, 10))
    with torch.no_grad():
        ref = model(x).logits
    info = finetune.save(model, tok, "lora", _params("lora"), tmp_path / "run", "tiny")
    assert info == {"type": "peft", "adapter": "adapter", "base": "tiny"}
    loaded, _, _ = artifacts.load(tmp_path / "run", "cpu")
    with torch.no_grad():
        assert torch.allclose(loaded(x).logits, ref, atol=1e-5)
    assert artifacts.dir_bytes(tmp_path / "run") > artifacts.dir_bytes("tiny")  # base + adapter
    assert not artifacts.is_quantized(tmp_path / "run")


def test_tensor_bytes_counts_tied_weights_once_and_16bit_floats():
    model, _, _ = artifacts.load("tiny", "cpu")
    n = sum(p.numel() for p in model.parameters())  # parameters() already yields tied weights once
    assert artifacts.tensor_bytes(model) >= 4 * n
    assert artifacts.tensor_bytes(model, float_bytes=2) < artifacts.tensor_bytes(model)


def test_nf4_size_is_the_same_every_time():
    """tensor_bytes must not depend on which addresses freed temporaries leave for the next ones."""
    from ptqlib import artifacts
    from ptqlib.stages.quantize import quantize

    model, _, _ = quantize("tiny", {"method": "nf4", "double_quant": True, "blocksize": 64}, None)
    sizes = {artifacts.tensor_bytes(model, float_bytes=2) for _ in range(8)}
    assert len(sizes) == 1, sizes

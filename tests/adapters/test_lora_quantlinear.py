import pytest
import torch
from peft import get_peft_model

from ptqlib.adapters.lora_quantlinear import (
    LoraQuantLinear,
    load_adapter,
    lora_config,
    lora_parameters,
)
from ptqlib.quant import QuantLinear, rtn_quantize_model


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: a second intra-op thread only adds contention on a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _quantized(tiny_model, device):
    rtn_quantize_model(tiny_model, bits=4, group_size=32, sym=False)
    return tiny_model.to(device)


def test_lora_trains_on_quantized_base(tiny_model, device):
    model = _quantized(tiny_model, device)
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(0)
    ids = torch.randint(3, 1024, (4, 32), device=device)
    with torch.no_grad():
        base_logits = model(ids).logits
    pm = get_peft_model(model, lora_config(r=8, lora_alpha=16, target_modules=TARGETS))
    wrapped = [m for m in pm.modules() if isinstance(m, LoraQuantLinear)]
    assert len(wrapped) == 14 and all(isinstance(m.base_layer, QuantLinear) for m in wrapped)
    assert all(p.dtype == torch.float32 for p in lora_parameters(pm))
    with torch.no_grad():  # B = 0 at init: the adapter starts as the identity
        torch.testing.assert_close(pm(input_ids=ids).logits, base_logits)

    opt = torch.optim.AdamW(lora_parameters(pm), lr=5e-3)
    pm.train()
    losses = []
    for _ in range(20):
        loss = pm(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5

    after = pm.get_base_model().state_dict()
    for k, v in frozen.items():  # codes, scales, zeros, norms, embeddings: all untouched
        key = k if k in after else k.replace(".qweight", ".base_layer.qweight").replace(
            ".qzeros", ".base_layer.qzeros").replace(".scales", ".base_layer.scales").replace(
            ".g_idx", ".base_layer.g_idx")
        assert torch.equal(after[key], v), k
    with pytest.raises(NotImplementedError, match="not supported"):
        pm.merge_and_unload()


def test_adapter_save_load_and_dtype(tiny_model, tmp_path):
    model = _quantized(tiny_model, "cpu")
    pm = get_peft_model(model, lora_config(r=4, target_modules=["q_proj", "v_proj"]))
    for p in lora_parameters(pm):
        torch.nn.init.normal_(p, std=0.02)
    ids = torch.randint(3, 1024, (1, 16))
    with torch.no_grad():
        ref = pm(input_ids=ids).logits
    pm.save_pretrained(tmp_path)
    base = pm.unload()  # adapters removed, QuantLinear back in place
    assert isinstance(base.model.layers[0].self_attn.q_proj, QuantLinear)
    again = load_adapter(base, str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, ref)
    again.to(torch.bfloat16)  # bf16 base: dequantize in bf16, adapter follows the cast, still runs
    with torch.no_grad():
        out = again(input_ids=ids).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()

"""bitsandbytes NF4 at evaluation: each Linear4bit multiplies by its weight de-quantized once, in the
stage's precision (bitsandbytes' own non-fused arithmetic); never by bnb's fused CPU kernel, which
computes in bf16 on a CPU with AVX512-BF16 even where the stage says fp32."""
import copy

import pytest
import torch

from ptqlib import artifacts, precision
from ptqlib.methods.bnb import dense_inference, prepare_inference
from ptqlib.methods.lora import keep_bnb_layout  # bnb's own fp32 path (no repack for its bf16 kernel)
from ptqlib.stages import quantize as ptq
from ptqlib.study.params import QuantizeParams


@pytest.fixture(scope="module")
def nf4_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("nf4")
    p = QuantizeParams(method="nf4").__dict__
    model, tok, _ = ptq.quantize("tiny", p)
    ptq.save(model, tok, p, out / "nf4", "tiny")
    return out / "nf4"


def test_bf16_inference_multiplies_by_the_weight_dequantized_once(nf4_dir, monkeypatch):
    import bitsandbytes.functional as bnbF
    from bitsandbytes.nn import Linear4bit

    monkeypatch.setenv(precision.FORCE_ENV, "1")
    model, _, _ = artifacts.load(nf4_dir, "cpu")
    own = copy.deepcopy(model)  # bitsandbytes' own path, computing in bf16
    layer = next(m for m in model.modules() if isinstance(m, Linear4bit))
    W = bnbF.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(torch.bfloat16)
    precision.cast_for_inference(model, "bf16")
    assert dense_inference(model, torch.bfloat16) > 0
    assert all(getattr(m, "_ptqlib_dense", False) for m in model.modules() if isinstance(m, Linear4bit))
    x = torch.randn(3, 5, layer.in_features)
    b = None if layer.bias is None else layer.bias.to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(layer(x), torch.nn.functional.linear(x.to(torch.bfloat16), W, b).float())
        for m in own.modules():
            if isinstance(m, Linear4bit):
                m.compute_dtype = torch.bfloat16
        precision.cast_for_inference(own, "fp32")  # bitsandbytes' own forward, untouched
        for m in own.modules():  # the float parameters in bf16 as cast_for_inference does
            for prm in m.parameters(recurse=False):
                if prm.is_floating_point():
                    prm.data = prm.data.to(torch.bfloat16)
        ids = torch.randint(0, 1024, (2, 24), generator=torch.Generator().manual_seed(0))
        ours, theirs = model(input_ids=ids).logits.float(), own(input_ids=ids).logits.float()
    assert ((ours - theirs).norm() / theirs.norm()) < 2e-2  # bf16 rounding of two orders of the same sums


def _as_on_a_cpu_with_avx512_bf16(model):
    """Every Linear4bit of ``model`` as bitsandbytes builds it on a CPU with AVX512-BF16 (its first
    inference forward repacks the weight for the fused kernel, which computes in bf16)."""
    from bitsandbytes.nn import Linear4bit

    for m in model.modules():
        if isinstance(m, Linear4bit):
            m.support_avx512bf16_for_cpu = True
    return model


def test_fp32_inference_is_bitsandbytes_fp32_arithmetic_bit_for_bit_on_every_cpu(nf4_dir):
    """The evaluate stage's hook at fp32: on a machine where bnb would repack for its bf16 kernel, the
    logits equal bnb's fp32 path (the one CPUs without AVX512-BF16 run) bit for bit, and no layer is
    repacked; before, the same stage computed in bf16 there and in fp32 elsewhere."""
    from bitsandbytes.nn import Linear4bit

    model = _as_on_a_cpu_with_avx512_bf16(artifacts.load(nf4_dir, "cpu")[0]).eval()
    own = keep_bnb_layout(artifacts.load(nf4_dir, "cpu")[0]).eval()
    prepare_inference(model, torch.float32)
    ids = torch.randint(0, 1024, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(input_ids=ids).logits, own(input_ids=ids).logits
        one_row = model(input_ids=ids[:1, :1]).logits, own(input_ids=ids[:1, :1]).logits  # a decode step, batch 1
    assert ours.dtype == torch.float32 and torch.equal(ours, theirs)
    assert torch.equal(*one_row)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False)
                   for m in model.modules() if isinstance(m, Linear4bit))


def test_an_fp32_evaluate_stage_of_nf4_scores_as_on_a_cpu_without_avx512_bf16(nf4_dir):
    """The whole stage (perplexity, KL-free, greedy generation) at fp32: the same metrics and outputs
    whether bitsandbytes would take its bf16 kernel on this CPU or not."""
    from ptqlib.data import load_task
    from ptqlib.stages.evaluate import run_stage
    from ptqlib.study.params import EvaluateParams

    ex = load_task("meetings-hard", "test", 3)
    p = EvaluateParams(ppl_samples=2, ppl_seq_len=32, ppl_sources=["pydoc"], task_samples=3, max_new_tokens=6,
                       batch_size=2, precision="fp32").__dict__
    model, tok, _ = artifacts.load(nf4_dir, "cpu")
    zen4 = run_stage(_as_on_a_cpu_with_avx512_bf16(model), tok, str(nf4_dir), ex, p, output_dir=None)
    model, tok, _ = artifacts.load(nf4_dir, "cpu")
    avx2 = run_stage(keep_bnb_layout(model), tok, str(nf4_dir), ex, p, output_dir=None)
    assert zen4[0]["ppl"] == avx2[0]["ppl"] and zen4[0]["precision"] == "fp32"
    assert [r["output"] for r in zen4[1]] == [r["output"] for r in avx2[1]]
    assert zen4[2]["ppl"]["nll"] == avx2[2]["ppl"]["nll"]

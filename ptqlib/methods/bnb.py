"""bitsandbytes NF4 / FP4 (QLoRA's data types): ``Linear4bit`` through transformers' ``BitsAndBytesConfig``.

Block-wise absmax scaling (``blocksize`` weights per constant), optionally with the constants
quantized again (double quantization); saved with transformers' 4-bit serialization. bitsandbytes
runs these on CPU since 0.46.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ptqlib.errors import check_positive
from ptqlib.methods import ArtifactType, Options, QuantizeMethod, StageSettings, register


@dataclass
class BnbOptions(Options):
    double_quant: bool = True  # nf4/fp4: quantize the absmax constants too (QLoRA's default)
    blocksize: int = 64  # nf4/fp4: bitsandbytes block size

    def __post_init__(self) -> None:
        check_positive("blocksize", self.blocksize)


def bnb_config(method: str, double_quant: bool = True, blocksize: int = 64):
    import torch
    from transformers import BitsAndBytesConfig

    # The stored compute dtype is fp32 on every machine: the stages that run the model compute in their own
    # ``precision`` (bf16 autocast where it says so). A compute dtype taken from the quantizing machine made
    # the same stage id a bf16 model when quantized on a GPU and an fp32 one on a CPU, and the artifact kept
    # computing in bf16 wherever it was loaded (a reloaded QDoRA 0.003 off its merge in logits).
    compute = torch.float32
    kw = {"bnb_4bit_quant_storage": torch.uint8}
    if blocksize != 64:
        kw["bnb_4bit_blocksize"] = blocksize  # newer transformers only; 64 is the universal default
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=method, bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=compute, **kw)


def quantize(input_ref: str, p: StageSettings, calib=None, progress: bool = False):
    from transformers import AutoModelForCausalLM

    from ptqlib import artifacts
    from ptqlib.models import load_tokenizer

    src = artifacts.float_model_dir(input_ref)
    model = AutoModelForCausalLM.from_pretrained(
        src, quantization_config=bnb_config(p.method, p.double_quant, p.blocksize),
        device_map=artifacts.default_device())
    return model, load_tokenizer(src), {}


def save(model, tokenizer, p: StageSettings, output_dir) -> dict:
    out = Path(output_dir)
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    return {"type": "bnb", "path": "model", "method": p.method}


def load(ref, info: dict, device: str):
    from transformers import AutoModelForCausalLM

    from ptqlib.models import load_tokenizer

    path = Path(ref) / info["path"]
    return AutoModelForCausalLM.from_pretrained(path, device_map=device), load_tokenizer(path)


def dense_weight(module):
    """A bitsandbytes ``Linear4bit``'s weight de-quantized (fp32); None for any other layer (and without
    importing bitsandbytes when nothing loaded it)."""
    import sys

    if "bitsandbytes" not in sys.modules or type(module).__name__ != "Linear4bit":
        return None
    import bitsandbytes.functional as F

    return F.dequantize_4bit(module.weight.data, module.weight.quant_state).float()


def prepare_inference(model, dtype) -> None:
    """The evaluate stage's hook, at every precision: every CPU ``Linear4bit`` multiplies by its weight
    de-quantized once, in ``dtype`` (:func:`dense_inference`).

    At fp32 too, so that an fp32 stage computes in fp32 on every CPU. bitsandbytes (0.50) on a CPU with
    AVX512-BF16 repacks a ``Linear4bit`` at its first inference forward and runs its fused kernel, which
    casts the input and the absmax constants to bf16 whatever the compute dtype ("cpu fused op only
    support bf16"); on a CPU without AVX512-BF16 the same layer de-quantizes in fp32 and multiplies in
    fp32. One evaluate stage id computed in bf16 on the Zen 4 and AMX machines and in fp32 on an AVX2 one.
    The dense fp32 weight is the second path's arithmetic, bit for bit (``tests/methods/test_bnb.py``).
    """
    dense_inference(model, dtype)


def dense_inference(model, dtype) -> int:
    """Every bitsandbytes ``Linear4bit`` of ``model`` on a CPU computes ``x @ W_hat.T + b`` from its
    weight de-quantized once, in ``dtype``; returns how many (0, without importing bitsandbytes, when
    it was never loaded). For the evaluate stage, after ``precision.cast_for_inference``: on a CPU with
    AVX512-BF16 bitsandbytes otherwise runs its fused 4-bit kernel (``gemv_4bit``, in bf16) at every
    call, far slower than the dense bf16 matmul at the study's shapes (``bench/nf4_eval.py``:
    perplexity windows 4.6x, generation 2.7x); without it, bnb de-quantizes the weight again at every
    call (0.2 s per forward of SmolLM2's 210 layers). The dense weight is what bitsandbytes' own
    non-fused path multiplies by (``dequantize_4bit``, then ``linear``), so this is bnb's arithmetic,
    not an approximation of it; it holds a ``dtype`` copy of the weights (fp32: the 16-bit model's
    size twice), as ``QuantLinear``'s inference cache does. Adapters around the layer (peft) are untouched.
    """
    import sys

    if "bitsandbytes" not in sys.modules:
        return 0  # nothing loaded a bitsandbytes layer: there is none to convert
    import bitsandbytes.functional as bnbF
    import torch
    from bitsandbytes.nn import Linear4bit
    from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

    n = 0
    for mod in model.modules():
        if not isinstance(mod, Linear4bit) or getattr(mod, "_ptqlib_dense", False):
            continue
        if mod.weight.device.type != "cpu":
            continue  # GPUs have bitsandbytes' kernels, and the 4-bit memory matters there
        fix_4bit_weight_quant_state_from_module(mod)  # as Linear4bit.forward does first
        state = mod.weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            raise ValueError("dense_inference: the layer already ran bitsandbytes' CPU kernel (its weight "
                             "was repacked); call it on a freshly loaded model")
        W = bnbF.dequantize_4bit(mod.weight.data, state).to(dtype)  # (out, in)
        bias = None if mod.bias is None else mod.bias.detach().to(dtype)

        def forward(x, W=W, bias=bias):  # as Linear4bit.forward: compute in dtype, return x's dtype
            return torch.nn.functional.linear(x.to(W.dtype), W, bias).to(x.dtype)

        mod.forward = forward
        mod._ptqlib_dense = True
        n += 1
    return n


_SETTINGS = ("blocksize", "double_quant")
register(
    QuantizeMethod("nf4", "bitsandbytes 4-bit NormalFloat, absmax per block", (4,), "bnb", quantize, save, _SETTINGS,
                   options=BnbOptions, dense_weight=dense_weight, prepare_inference=prepare_inference),
    QuantizeMethod("fp4", "bitsandbytes 4-bit float, absmax per block", (4,), "bnb", quantize, save, _SETTINGS,
                   options=BnbOptions, dense_weight=dense_weight, prepare_inference=prepare_inference),
    ArtifactType("bnb", load, quantized=True),
)

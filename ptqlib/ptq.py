"""The quantize stage: one call per method, the same artifact layout for all of them.

- ``rtn`` / ``gptq``: ptqlib's own (``ptqlib.quant``): decoder linears become ``QuantLinear``
  and the model is saved in the GPTQ checkpoint layout; RTN and GPTQ differ only in how the
  integer codes are chosen.
- ``nf4`` / ``fp4``: bitsandbytes ``Linear4bit`` via transformers' ``BitsAndBytesConfig``
  (block-wise absmax, optional double quantization), saved with transformers' 4-bit
  serialization. bitsandbytes runs these on CPU since 0.46.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from ptqlib import artifacts


def bnb_config(method: str, double_quant: bool = True, blocksize: int = 64):
    from transformers import BitsAndBytesConfig

    # compute in fp32 on CPU (bf16 matmuls are slow there), in bf16 on GPU
    compute = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    kw = {"bnb_4bit_quant_storage": torch.uint8}
    if blocksize != 64:
        kw["bnb_4bit_blocksize"] = blocksize  # newer transformers only; 64 is the universal default
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=method, bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=compute, **kw)


def float_model_dir(input_ref: str) -> Path:
    """The directory of the float model a quantize stage reads (a model name or an ``hf`` artifact)."""
    from ptqlib.models import resolve_model

    info = artifacts.describe(input_ref)
    if info["type"] == "name":
        return Path(resolve_model(info["name"]))
    if info["type"] == "hf":
        return Path(input_ref) / info["path"]
    raise ValueError(f"{input_ref}: a {info['type']!r} artifact is not a float model; merge it before quantizing")


def quantize(input_ref: str, p: dict, calib: torch.Tensor | None = None, progress: bool = False):
    """Quantize the float model at ``input_ref`` -> (model, tokenizer, stats)."""
    from ptqlib.models import load_tokenizer

    src = float_model_dir(input_ref)
    tok = load_tokenizer(src)
    device = artifacts.default_device()
    t0 = time.perf_counter()
    if p["method"] in ("nf4", "fp4"):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            src, quantization_config=bnb_config(p["method"], p["double_quant"], p["blocksize"]), device_map=device)
        stats: dict = {}
    else:
        model, _, _ = artifacts.load(input_ref, device)
        if p["method"] == "rtn":
            from ptqlib.quant import rtn_quantize_model

            stats = rtn_quantize_model(model, bits=p["bits"], group_size=p["group_size"], sym=p["sym"],
                                       progress=progress, sym_grid=p["sym_grid"])
        else:
            from ptqlib.quant.gptq import gptq_quantize_model

            stats = gptq_quantize_model(
                model, [c.unsqueeze(0) for c in calib], bits=p["bits"], group_size=p["group_size"], sym=p["sym"],
                act_order=p["act_order"], static_groups=p["static_groups"], true_sequential=p["true_sequential"],
                damp=p["damp"], block_size=p["block_size"], progress=progress,
                group_grid=p["group_grid"], sym_grid=p["sym_grid"])
    stats = dict(stats or {})
    stats["quant_seconds"] = time.perf_counter() - t0
    model.eval()
    return model, tok, stats


def save(model, tokenizer, p: dict, output_dir: str | Path) -> dict:
    out = Path(output_dir)
    if p["method"] in ("nf4", "fp4"):
        model.save_pretrained(out / "model")
        tokenizer.save_pretrained(out / "model")
        info = {"type": "bnb", "path": "model", "method": p["method"]}
    else:
        from ptqlib.quant import save_quantized

        save_quantized(model, out / "model", tokenizer=tokenizer)
        info = {"type": "quant", "path": "model", "method": p["method"]}
    artifacts.save(out, info)
    return info


def dequantize_model(model) -> torch.nn.Module:
    """Replace every ``QuantLinear`` by an ``nn.Linear`` holding its de-quantized weight (in place)."""
    from ptqlib.quant import QuantLinear, set_module

    for name, mod in list(model.named_modules()):
        if isinstance(mod, QuantLinear):
            lin = torch.nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None,
                                  device=mod.scales.device, dtype=torch.float32)
            with torch.no_grad():
                lin.weight.copy_(mod.dequantize_weight(torch.float32))
                if mod.bias is not None:
                    lin.bias.copy_(mod.bias)
            set_module(model, name, lin)
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    return model


def weight_error(model_fp, model_q) -> dict[str, float]:
    """Relative Frobenius error ||W - W_hat|| / ||W|| per quantized linear (names as in the model)."""
    from ptqlib.quant import QuantLinear

    fp = dict(model_fp.named_modules())
    out = {}
    for name, mod in model_q.named_modules():
        w = None
        if isinstance(mod, QuantLinear):
            w = mod.dequantize_weight(torch.float32)
        elif type(mod).__name__ == "Linear4bit":
            import bitsandbytes.functional as F

            w = F.dequantize_4bit(mod.weight.data, mod.weight.quant_state).float()
        if w is not None and name in fp:
            ref = fp[name].weight.detach().float()
            out[name] = (torch.linalg.norm(ref - w.to(ref.device)) / torch.linalg.norm(ref)).item()
    return out

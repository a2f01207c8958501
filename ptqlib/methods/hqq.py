"""HQQ (Badri & Shaji 2023, Half-Quadratic Quantization): calibration-free weight quantization.

Per group of ``g`` input columns of a row, HQQ starts from the min-max grid ``q = round(W / s + z)``
and fits the zero point ``z`` by a half-quadratic proximal solver that minimises ``||W - s (q - z)||_p``
(``p = 0.7``, robust to outliers) instead of the squared error; no calibration data. The codes,
scales and zero points are the maintained ``hqq`` library's own (``hqq.core.quantize.Quantizer``,
with its defaults for the bit width: ``round_zero`` at 4 bits, ``optimize``, ``axis=1`` = groups along
the input), loaded into ``QuantLinear`` with float zero points (the solver leaves ``z`` fractional),
so the de-quantized weight is what ``Quantizer.dequantize`` gives, bit for bit, and QLoRA / QA-LoRA
train on it, evaluation runs it and GGUF export takes it where the grid fits.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from ptqlib.methods import Options, QuantizeMethod, StageSettings, register
from ptqlib.methods.uniform import save_uniform

BITS = (2, 3, 4, 8)  # of hqq's bit widths, those QuantLinear packs


@dataclass
class HQQOptions(Options):
    optimize: bool = True  # hqq: fit the zero point with the half-quadratic solver (false: the plain min-max grid)


def _library():
    try:
        from hqq.core.quantize import Quantizer
    except ImportError as e:
        raise ImportError(f"method hqq needs the hqq library: pip install 'ptqlib[baselines]' ({e})") from e
    return Quantizer


def hqq_codes(w, bits: int, group_size: int, optimize: bool = True):
    """``w (out, in)`` -> ``(codes (out, in), scales (out, G), zeros (out, G), meta)`` on the CPU: the
    library's quantization of the weight in fp32 (``meta``: what ``Quantizer.dequantize`` takes)."""
    import torch

    Quantizer = _library()
    out_f, in_f = w.shape
    # on the CPU, always: hqq's solver runs in fp16 on CUDA, which would give other codes for the same stage
    W_q, meta = Quantizer.quantize(
        w.detach().float().cpu(), nbits=bits, channel_wise=True, group_size=None if group_size == -1 else group_size,
        optimize=optimize, round_zero=bits == 4, axis=1, bitpack=False, compute_dtype=torch.float32, device="cpu")
    meta["compute_dtype"] = torch.float32  # de-quantize as computed, not in the library's fp16 default
    G = 1 if group_size == -1 else in_f // group_size
    codes = W_q.reshape(out_f, in_f).to(torch.uint8)
    return codes, meta["scale"].reshape(out_f, G).float(), meta["zero"].reshape(out_f, G).float(), {**meta, "W_q": W_q}


def quantize(input_ref: str, p: StageSettings, calib=None, progress: bool = False):
    import torch
    from tqdm.auto import tqdm

    from ptqlib import artifacts
    from ptqlib.quant.grid import n_groups
    from ptqlib.quant.layers import find_linear_layers, set_module
    from ptqlib.quant.qlinear import QuantLinear
    from ptqlib.quant.rtn import QUANT_INFO_ATTR

    _library()
    model, tok, _ = artifacts.load(input_ref)
    linears = find_linear_layers(model)
    for lin in linears.values():
        n_groups(lin.in_features, p.group_size)  # validate before touching the model
    t0 = time.perf_counter()
    with torch.no_grad():  # the weight error is the quantize stage's (stages.quantize.weight_error)
        for name, lin in tqdm(linears.items(), desc="HQQ", disable=not progress):
            w = lin.weight.detach()
            codes, scales, zeros, _ = hqq_codes(w, p.bits, p.group_size, p.optimize)
            codes, scales, zeros = codes.to(w.device), scales.to(w.device), zeros.to(w.device)
            q = QuantLinear.from_codes(codes, scales, zeros, bias=None if lin.bias is None else lin.bias.detach().float(),
                                       bits=p.bits, group_size=p.group_size, float_zeros=True)
            set_module(model, name, q)
    info = {"method": "hqq", "bits": p.bits, "group_size": p.group_size, "sym": False, "desc_act": False,
            "static_groups": False, "optimize": p.optimize}
    setattr(model, QUANT_INFO_ATTR, info)
    return model, tok, {**info, "time_s": time.perf_counter() - t0, "n_layers": len(linears)}


register(QuantizeMethod("hqq", "HQQ: zero point fitted by a half-quadratic solver, no calibration (hqq library)", BITS,
                        "uniform", quantize, save_uniform, settings=("bits", "group_size", "optimize"),
                        label_keys=("bits", "group_size"), options=HQQOptions))

"""AutoRound and AWQ through Intel's maintained ``auto-round`` library (one library for both).

- ``autoround`` (Cheng et al. 2023, SignRound): per decoder block, learns a rounding offset
  ``V in [-0.5, 0.5]`` per weight and a scale on each group's min / max by signed gradient descent on
  the block's output error over calibration windows: ``W_hat = s (clamp(round(W / s + V) + z) - z)``.
- ``awq`` (Lin et al. 2024, Activation-aware Weight Quantization): per group of layers that share an
  input, a per-input-channel scale ``S = mean|x|^a / mean|W|^(1 - a)`` (grid search over ``a``) is
  multiplied into the weights and divided out of the previous op (RMSNorm weight, or the previous
  linear's rows), so salient channels lose less to rounding; then round-to-nearest with an
  optional per-group clipping search. The folded norms are part of the output model.

The library does the algorithm; ptqlib takes its result as it is: after ``quantize()`` each layer
holds the library's de-quantized weight and its ``scale`` / ``zp``, the integer codes are read back
as ``q = W_hat / s + z`` (checked to be integers that reproduce ``W_hat`` exactly, so they are the
library's codes, not a re-quantization) and become a ``QuantLinear`` (integer zero points, the GPTQ
layout), in the library's in-memory model (its folded norms included). The library's own GPTQ-format
export is not used for the model: it writes the norms from before AWQ's folding (auto-round 0.16.1),
a model that does not compute what was tuned. Both tune in fp32 (``amp`` off; ``fixed_precision``:
``precision`` is not read and not in their ids), so that the library's de-quantized weight is exactly its codes. The other AWQ libraries do not
fit: llm-compressor 0.14 pins transformers 5.17 (a downgrade), AutoAWQ is archived, GPTQModel needs CUDA.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from ptqlib.errors import ConfigError, check_positive
from ptqlib.methods import Options, QuantizeMethod, StageSettings, register
from ptqlib.methods.uniform import save_uniform
from ptqlib.quant.grid import SUPPORTED_BITS


@dataclass
class AutoRoundOptions(Options):
    sym: bool = False  # rtn/gptq/awq/autoround: symmetric grid (zero fixed at 2^(b-1))
    iters: int = 200  # autoround: signed-gradient steps per decoder block (the paper's 200; 50 is its light recipe)
    round_lr: float = 0.0  # autoround: step size of the rounding and min / max updates (0: the library's default, 1 / iters)
    batch_size: int = 8  # autoround: calibration windows per step

    def __post_init__(self) -> None:
        check_positive("iters", self.iters)
        check_positive("batch_size", self.batch_size)
        if isinstance(self.round_lr, bool) or not isinstance(self.round_lr, (int, float)) or not self.round_lr >= 0:
            raise ConfigError(f"round_lr: {self.round_lr!r} must be 0 (the library's 1 / iters) or a positive number")


@dataclass
class AWQOptions(Options):
    sym: bool = False  # rtn/gptq/awq/autoround: symmetric grid (zero fixed at 2^(b-1))
    clip: bool = True  # awq: search a clipping range per group after scaling (llm-awq's auto_clip; the library's default is off)
    n_grid: int = 20  # awq: grid points of the scale exponent a in [0, 1)

    def __post_init__(self) -> None:
        check_positive("n_grid", self.n_grid)


def _library():
    try:
        import auto_round  # noqa: F401
    except ImportError as e:
        raise ImportError(f"methods autoround / awq need the auto-round library: pip install 'ptqlib[baselines]' ({e})") from e


def library_codes(layer, bits: int, group_size: int, name: str = ""):
    """The codes, scales ``(out, G)`` and zero points ``(out, G)`` of a layer the library quantized
    (its ``weight`` = the de-quantized weight, ``scale`` and ``zp`` per group), checked exact."""
    import torch

    w = layer.weight.detach().float()
    out_f, in_f = w.shape
    scale = layer.scale.reshape(out_f, -1)
    zp = 2 ** (bits - 1) if layer.zp is None else layer.zp  # a symmetric grid: one number (the library's maxq)
    zp = torch.as_tensor(zp, dtype=torch.float32)
    zp = zp.expand_as(scale).float() if zp.numel() == 1 else zp.reshape(out_f, -1).float()
    g = in_f // scale.shape[1]
    s_e, z_e = scale.float().repeat_interleave(g, dim=1), zp.repeat_interleave(g, dim=1)
    codes = torch.round(w / s_e + z_e)
    if not torch.equal((codes - z_e) * s_e, w) or codes.min() < 0 or codes.max() > 2 ** bits - 1:
        raise RuntimeError(f"layer {name!r}: the library's weight is not its codes on the {bits}-bit grid "
                           f"(max error {float(((codes - z_e) * s_e - w).abs().max()):.3g})")
    return codes.to(torch.uint8), scale, zp


def _quantize(algorithm: str, input_ref: str, p: StageSettings, calib=None, progress: bool = False):
    import torch

    from ptqlib import artifacts
    from ptqlib.quant.grid import n_groups
    from ptqlib.quant.layers import find_linear_layers, set_module
    from ptqlib.quant.qlinear import QuantLinear
    from ptqlib.quant.rtn import QUANT_INFO_ATTR

    _library()
    from auto_round import AutoRound
    from auto_round.algorithms.quantization.rtn.config import RTNConfig
    from auto_round.algorithms.transforms.awq.config import AWQConfig

    if calib is None:
        raise ValueError(f"{algorithm} needs calibration windows (ptqlib.stages.quantize.calibration_windows)")
    model, tok, _ = artifacts.load(input_ref)
    model.float()
    linears = find_linear_layers(model)
    for lin in linears.values():
        n_groups(lin.in_features, p.group_size)  # validate before the library runs
    grid = dict(bits=p.bits, group_size=p.group_size, sym=p.sym)
    common = dict(tokenizer=tok, nsamples=len(calib), seqlen=int(calib[0].numel()), dataset=[c.reshape(1, -1) for c in calib],
                  device_map=str(model.device), enable_torch_compile=False, amp=False, seed=p.calib_seed)
    t0 = time.perf_counter()
    if algorithm == "autoround":
        kw = dict(iters=p.iters, batch_size=min(p.batch_size, len(calib)), **({"lr": p.round_lr} if p.round_lr else {}))
        ar = AutoRound(model, scheme="W4A16", **grid, **kw, **common)
    else:
        ar = AutoRound(model, alg_configs=[AWQConfig(**grid, apply_clip=p.clip, n_grid=p.n_grid), RTNConfig(**grid)],
                       batch_size=min(8, len(calib)), **common)
    model, _ = ar.quantize()
    seconds = time.perf_counter() - t0
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config  # ptqlib's checkpoint writes its own
    # the weight error is the quantize stage's (stages.quantize.weight_error), as for every method
    with torch.no_grad():
        for name, lin in find_linear_layers(model).items():
            if getattr(lin, "scale", None) is None:
                raise RuntimeError(f"{algorithm}: the library left layer {name!r} unquantized")
            codes, scales, zeros = library_codes(lin, p.bits, p.group_size, name)
            q = QuantLinear.from_codes(codes, scales, zeros, bias=None if lin.bias is None else lin.bias.detach(),
                                       bits=p.bits, group_size=p.group_size)
            set_module(model, name, q)
    info = {"method": algorithm, "bits": p.bits, "group_size": p.group_size, "sym": p.sym, "desc_act": False,
            "static_groups": False}
    setattr(model, QUANT_INFO_ATTR, info)
    return model, tok, {**info, "time_s": seconds, "n_layers": len(linears),
                        "weights_rescaled": algorithm == "awq"}  # AWQ: no error against the float weight


def quantize_autoround(input_ref: str, p: StageSettings, calib=None, progress: bool = False):
    return _quantize("autoround", input_ref, p, calib, progress)


def quantize_awq(input_ref: str, p: StageSettings, calib=None, progress: bool = False):
    return _quantize("awq", input_ref, p, calib, progress)


register(
    QuantizeMethod("awq", "AWQ: activation-aware channel scales folded into the previous op, then RTN (auto-round)",
                   SUPPORTED_BITS, "uniform", quantize_awq, save_uniform,
                   settings=("bits", "group_size", "sym", "calib_samples", "calib_seq_len"),
                   label_keys=("bits", "group_size"), calibration=True, options=AWQOptions, fixed_precision="fp32"),
    QuantizeMethod("autoround", "AutoRound: rounding and min / max learned by signed gradient per block (auto-round)",
                   SUPPORTED_BITS, "uniform", quantize_autoround, save_uniform,
                   settings=("bits", "group_size", "sym", "iters", "calib_samples", "calib_seq_len"),
                   label_keys=("bits", "group_size"), calibration=True, options=AutoRoundOptions, fixed_precision="fp32"),
)

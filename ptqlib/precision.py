"""Compute precision of a stage: ``auto | fp32 | bf16`` (the ``precision`` setting of every stage kind).

The seed papers train and evaluate in bf16; on a CPU without native bf16 arithmetic bf16 is
emulated and slower than fp32, so ``auto`` picks bf16 only where the hardware computes it:

- CUDA: ``torch.cuda.is_bf16_supported()`` (Ampere and newer);
- x86 CPUs: the ``avx512_bf16`` (AMD Zen 4, Intel Cooper Lake / Sapphire Rapids) or ``amx_bf16``
  (Intel Sapphire Rapids and newer) flag in ``/proc/cpuinfo``;
- elsewhere fp32.

What each precision means per stage kind (the papers' mixed precision):

- finetune ``bf16``: ``torch.autocast`` bf16 through transformers ``Trainer`` (``bf16=True``): the
  master weights, gradients of float parameters and AdamW's state stay fp32, matmuls run in bf16;
- evaluate ``bf16``: the model's float parameters are cast to bf16 (:func:`cast_for_inference`),
  perplexity and generation run in bf16; ``QuantLinear`` de-quantizes to the input's dtype;
- quantize ``bf16``: GPTQ's calibration forwards under bf16 autocast (the reference runs them in
  fp16); the Hessian, the Cholesky and the column updates stay fp32.

``auto`` is resolved when the study file is loaded (``study.schema.load_study``), so the stage id and the
record carry the precision that runs. Asking for ``bf16`` where the hardware lacks it is an error
naming the flags looked for, unless ``PTQLIB_FORCE_BF16=1`` (emulated bf16: correct, slow).
``PTQLIB_AUTO_PRECISION=bf16|fp32`` resolves ``auto`` as another machine did, to read a report it made
(``ptqlib analyse``); the ids carry the resolved precision, so without it every id of that report differs.
This module imports torch only to ask CUDA, so the study file validates without it.
"""
from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path

from ptqlib.errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16")
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
FORCE_ENV = "PTQLIB_FORCE_BF16"
# what ``auto`` resolves to, whatever this machine computes: to analyse a report made on another CPU (its stage
# ids carry the precision ``auto`` was there); running a bf16 stage where bf16 is not native is still refused
AUTO_ENV = "PTQLIB_AUTO_PRECISION"


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of ``/proc/cpuinfo`` (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def _cuda_device() -> bool:
    """A CUDA device is visible (torch is imported only where an NVIDIA driver is present)."""
    if not Path("/proc/driver/nvidia").exists() and not os.environ.get("PTQLIB_ASK_CUDA"):
        return False
    import torch

    return torch.cuda.is_available()


def bf16_native(device: str | None = None) -> tuple[bool, str]:
    """(native bf16 on ``device``, what was looked at). ``device``: "cuda", "cpu" or None (the
    device stages run on: CUDA when available)."""
    if device is None:
        device = "cuda" if _cuda_device() else "cpu"
    if device.startswith("cuda"):
        import torch

        ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
        return ok, "torch.cuda.is_bf16_supported()"
    found = [f for f in CPU_BF16_FLAGS if f in cpu_flags()]
    return bool(found), ("CPU flags " + " / ".join(CPU_BF16_FLAGS) + " in /proc/cpuinfo"
                         + (f" (found {', '.join(found)})" if found else " (none found)"))


def forced() -> bool:
    return os.environ.get(FORCE_ENV, "").lower() in ("1", "true", "yes", "on")


def resolve(precision: str, device: str | None = None) -> str:
    """``auto`` -> ``bf16`` where native, else ``fp32`` (or :data:`AUTO_ENV`'s value); ``bf16`` is checked
    (:data:`FORCE_ENV` to force)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision: {precision!r} is not valid; valid: {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return "fp32"
    if precision == "auto" and (given := os.environ.get(AUTO_ENV)):
        if given not in ("fp32", "bf16"):
            raise ConfigError(f"{AUTO_ENV}={given!r} is not valid; valid: fp32, bf16 (or unset: what this machine "
                              "computes natively)")
        return given
    native, looked = bf16_native(device)
    if precision == "auto":
        return "bf16" if native else "fp32"
    if not native and not forced():
        raise ConfigError(f"precision: 'bf16' asked for, but this machine does not compute bf16 natively "
                          f"(looked at {looked}); use precision: auto or fp32, or set {FORCE_ENV}=1 to run "
                          "emulated bf16 (slower than fp32)")
    return "bf16"


@contextlib.contextmanager
def auto_as(precision: str):
    """Resolve ``auto`` to ``precision`` inside the block (:data:`AUTO_ENV`), as another machine did."""
    old = os.environ.get(AUTO_ENV)
    os.environ[AUTO_ENV] = precision
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(AUTO_ENV, None)
        else:
            os.environ[AUTO_ENV] = old


def dtype(precision: str):
    """The torch compute dtype of a resolved precision."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16}[resolve(precision)]


def autocast(precision: str, device_type: str = "cpu"):
    """A bf16 ``torch.autocast`` context for ``bf16``, a no-op for ``fp32``."""
    import torch

    if resolve(precision) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16)


def cast_for_inference(model, precision: str):
    """Cast the float *parameters* of ``model`` to the precision's dtype, in place; returns it.

    Buffers are left as they are: ``QuantLinear``'s scales / zero points (de-quantized to the
    input's dtype in its forward), and rotary ``inv_freq`` (bf16 would shift the angle of position
    256 by up to half a radian). bitsandbytes 4-bit layers compute in the new dtype (the evaluate
    stage then has them multiply by their weights de-quantized once, in its precision, on a CPU:
    ``methods.bnb.dense_inference``).
    """
    import torch

    dt = dtype(precision)
    if dt == torch.float32:
        return model
    for mod in model.modules():
        for name, prm in mod.named_parameters(recurse=False):
            if prm.is_floating_point() and prm.dtype != dt:
                prm.data = prm.data.to(dt)
        if hasattr(mod, "compute_dtype") and type(mod).__name__.startswith("Linear4bit"):
            mod.compute_dtype = dt
    return model


def attention_kernels(device_type: str):
    """The scaled-dot-product attention kernels a stage may use on ``device_type``: on CUDA every
    backend but cuDNN's; on a CPU (which has no cuDNN attention) a no-op.

    PyTorch picks cuDNN's attention first for bf16 on Hopper GPUs, and cuDNN builds an execution plan for
    every new (batch, length). Measured on an H200 (torch 2.11, the tiny model): 23 ms per attention call
    at a new shape, so a perplexity pass at a new batch size took 65 ms instead of 4 at bf16 (3.5 ms at
    fp32, which cuDNN does not take), and at the smoke study's shapes bf16 evaluation ran 12-20x slower
    than fp32. Without cuDNN a new shape costs 3-5 ms once. Generation prefills a new padded length per
    batch and training batches vary in length, so both pay it again and again."""
    if device_type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])

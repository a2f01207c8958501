"""LoftQ: QLoRA with the adapter started at the quantization error (Li et al., "LoftQ: LoRA-Fine-Tuning-Aware
Quantization for Large Language Models", ICLR 2024, arXiv 2310.08659): the initialisation the L4Q paper
compares with. See ``docs/methods.md``, section LoftQ.

QLoRA starts from ``B = 0``, so training begins at the quantized model ``Q`` and first has to undo
its error ``W - Q``. LoftQ starts the adapter at the best rank-r approximation of that error::

    s B A  ~=  W - Q                      s = alpha / r;  W (out, in) the float weight
    R = (W - Q) / s = U S V^T             (SVD)
    B = U_r sqrt(S_r)     (out, r)        A = sqrt(S_r) V_r^T   (r, in)

By Eckart-Young ``||W - Q - s B A||_F^2 = sum_{i > r} S_i^2 (times s^2)``, the least any rank-r
start can leave. ``Q`` is the given PTQ base (a bitsandbytes nf4 / fp4 stage's output, kept as it
is), ``W`` the float weights that stage quantized (read from its input's safetensors): LoftQ's
alternating steps ``Q_t = q(W - s B_{t-1} A_{t-1})`` reduce to their first one, so the base's codes
are the same as PTQ -> QLoRA's and only the adapter's start differs. Training is then QLoRA's.

Why not peft's ``replace_lora_weights_loftq``, which does the same step: it moves every weight to
CUDA unconditionally (this project runs on CPU too), and its ``B A`` equals ``W - Q`` without the
scale ``s``, so for ``alpha != r`` the start over- or under-corrects by ``s``.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from torch import Tensor

from ptqlib.methods import FinetuneMethod, StageSettings, lora, register

log = logging.getLogger(__name__)


def float_weights(float_dir: str | Path) -> Callable[[str], Tensor]:
    """``name -> tensor`` over a model directory's safetensors (one file or an index of shards)."""
    from safetensors import safe_open

    d = Path(float_dir)
    index = d / "model.safetensors.index.json"
    if index.exists():
        shard = {k: d / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    elif (d / "model.safetensors").exists():
        shard = None
    else:
        raise FileNotFoundError(f"{d}: no model.safetensors (or index): LoftQ reads the float weights from it")

    def get(name: str):
        path = shard[name] if shard is not None else d / "model.safetensors"
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return f.get_tensor(name)

    return get


def loftq_initialise(peft_model, float_dir: str | Path, adapter: str = "default") -> dict[str, tuple[float, float]]:
    """Set every bnb LoRA layer's ``A``, ``B`` to LoftQ's start (module docstring), in place.

    Returns ``{layer: (||W - Q||_F / ||W||_F, ||W - Q - s B A||_F / ||W||_F)}``.
    """
    import torch
    from bitsandbytes.functional import dequantize_4bit
    from peft.tuners.lora.bnb import Linear4bit

    weight_of = float_weights(float_dir)
    prefix = "base_model.model."
    errors = {}
    with torch.no_grad():
        for name, mod in peft_model.named_modules():
            if not isinstance(mod, Linear4bit) or adapter not in mod.lora_A:
                continue
            qw = mod.get_base_layer().weight
            Q = dequantize_4bit(qw.data, qw.quant_state).float().cpu()  # (out, in)
            W = weight_of(name.removeprefix(prefix) + ".weight").float()  # (out, in)
            s, r = mod.scaling[adapter], mod.r[adapter]
            U, S, Vh = torch.linalg.svd((W - Q) / s, full_matrices=False)
            root = S[:r].sqrt()
            A, B = root[:, None] * Vh[:r], U[:, :r] * root  # (r, in), (out, r)
            a, b = mod.lora_A[adapter].weight, mod.lora_B[adapter].weight
            a.copy_(A.to(a.device, a.dtype))
            b.copy_(B.to(b.device, b.dtype))
            norm = torch.linalg.norm(W)
            errors[name.removeprefix(prefix)] = ((torch.linalg.norm(W - Q) / norm).item(),
                                                 (torch.linalg.norm(W - Q - s * B @ A) / norm).item())
    if not errors:
        raise ValueError("loftq found no bitsandbytes 4-bit LoRA layer: its input must be an nf4 / fp4 model")
    return errors


def prepare(model, p: StageSettings, input_ref: str | None):
    from ptqlib import artifacts

    if input_ref is None:
        raise ValueError("loftq needs input_ref (the nf4 / fp4 stage it trains on) to find the float weights")
    model = lora.prepare(model, p, input_ref)  # QLoRA's adapters on the bnb base
    errors = loftq_initialise(model, artifacts.float_model_dir(artifacts.input_of(input_ref)))
    before = sum(e[0] for e in errors.values()) / len(errors)
    after = sum(e[1] for e in errors.values()) / len(errors)
    print(f"LoftQ start on {len(errors)} layers: mean ||W - Q|| / ||W|| {before:.4f} -> "
          f"||W - Q - sBA|| / ||W|| {after:.4f} (rank {p.rank})")
    return model


register(FinetuneMethod("loftq", "QLoRA with the adapter started at the rank-r SVD of the quantization error",
                        needs="bnb", gives="adapter", prepare=prepare, save=lora.save,
                        settings=("lr", "steps", "rank", "alpha"), can_merge=True, options=lora.MergeOptions))

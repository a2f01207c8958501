"""LoftQ: QLoRA with the adapter started at the quantization error (Li et al., "LoftQ: LoRA-Fine-Tuning-Aware
Quantization for Large Language Models", ICLR 2024, arXiv 2310.08659): the initialisation the L4Q paper
compares with. See ``docs/methods.md``, section LoftQ.

QLoRA starts from ``B = 0``, so training begins at the quantized model ``Q`` and first has to undo
its error ``W - Q``. LoftQ starts the adapter at the best rank-r approximation of that error::

    s B A  ~=  W - Q                      s = alpha / r;  W (out, in) the float weight
    R = (W - Q) / s = U S V^T             (SVD)
    B = U_r sqrt(S_r)     (out, r)        A = sqrt(S_r) V_r^T   (r, in)

By Eckart-Young ``||W - Q - s B A||_F^2 = sum_{i > r} S_i^2 (times s^2)``, the least any rank-r
start can leave. ``Q`` is the given PTQ base (a bitsandbytes nf4 / fp4 stage's output), ``W`` the float
weights that stage quantized (read from its input's safetensors). LoftQ alternates ``T`` times
(``loftq_iter``)::

    Q_1 = q(W)  (the PTQ stage's codes);   Q_t = q(W - s B_{t-1} A_{t-1})  for t > 1
    s B_t A_t = the rank-r SVD of W - Q_t

with ``q`` the base's own quantizer (its data type, block size and double quantization). At ``T = 1`` the
base's codes are PTQ -> QLoRA's and only the adapter's start differs; at ``T > 1`` the base is
re-quantized, so the stage saves it beside the adapter (``base/``, a bitsandbytes artifact of its own).
Users report that more iterations can hurt (LoftQ issues #5, #25 upstream): ``T`` is a setting a study
can compare. Training is then QLoRA's.

Why not peft's ``replace_lora_weights_loftq``, which does the same step: it moves every weight to
CUDA unconditionally (this project runs on CPU too), and its ``B A`` equals ``W - Q`` without the
scale ``s``, so for ``alpha != r`` the start over- or under-corrects by ``s``.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from torch import Tensor

from dataclasses import dataclass

from ptqlib.errors import ConfigError
from ptqlib.methods import FinetuneMethod, StageSettings, lora, register

log = logging.getLogger(__name__)


@dataclass
class LoftQOptions(lora.MergeOptions):
    loftq_iter: int = 1  # loftq: alternating steps T (1: the PTQ stage's codes kept; > 1 re-quantizes the base, saved with the stage)

    def __post_init__(self) -> None:
        if isinstance(self.loftq_iter, bool) or not isinstance(self.loftq_iter, int) or self.loftq_iter < 1:
            raise ConfigError(f"loftq_iter: {self.loftq_iter!r} must be an integer >= 1 (LoftQ's alternating steps)")


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


def _requantize(layer, w):
    """``layer``'s bitsandbytes weight replaced by ``w`` (out, in) quantized as the old one was (its data type,
    block size, double quantization): LoftQ's ``q``."""
    import bitsandbytes as bnb
    import torch
    from bitsandbytes.functional import quantize_4bit

    old = layer.weight
    qs = old.quant_state
    data, state = quantize_4bit(w.to(old.device, torch.float32).contiguous(), blocksize=qs.blocksize,
                                compress_statistics=qs.nested, quant_type=qs.quant_type, quant_storage=old.dtype)
    layer.weight = bnb.nn.Params4bit(data, requires_grad=False, quant_state=state, blocksize=qs.blocksize,
                                     compress_statistics=qs.nested, quant_type=qs.quant_type, quant_storage=old.dtype,
                                     module=layer, bnb_quantized=True)


def _svd_start(W, Q, s: float, r: int):
    """(A (r, in), B (out, r)): ``s B A`` the rank-r SVD of ``W - Q`` (module docstring)."""
    import torch

    U, S, Vh = torch.linalg.svd((W - Q) / s, full_matrices=False)
    root = S[:r].sqrt()
    return root[:, None] * Vh[:r], U[:, :r] * root


def loftq_initialise(peft_model, float_dir: str | Path, adapter: str = "default",
                     iters: int = 1) -> dict[str, tuple[float, float]]:
    """Set every bnb LoRA layer's ``A``, ``B`` to LoftQ's start after ``iters`` alternating steps (module
    docstring), in place; at ``iters > 1`` each base layer's codes too.

    Returns ``{layer: (||W - Q_1||_F / ||W||_F, ||W - Q_T - s B_T A_T||_F / ||W||_F)}``.
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
            base = mod.get_base_layer()
            W = weight_of(name.removeprefix(prefix) + ".weight").float()  # (out, in)
            s, r = mod.scaling[adapter], mod.r[adapter]
            Q = dequantize_4bit(base.weight.data, base.weight.quant_state).float().cpu()  # Q_1, (out, in)
            first = torch.linalg.norm(W - Q)
            A, B = _svd_start(W, Q, s, r)
            for _ in range(iters - 1):
                _requantize(base, W - s * B @ A)
                Q = dequantize_4bit(base.weight.data, base.weight.quant_state).float().cpu()  # Q_t
                A, B = _svd_start(W, Q, s, r)
            a, b = mod.lora_A[adapter].weight, mod.lora_B[adapter].weight
            a.copy_(A.to(a.device, a.dtype))
            b.copy_(B.to(b.device, b.dtype))
            norm = torch.linalg.norm(W)
            errors[name.removeprefix(prefix)] = ((first / norm).item(), (torch.linalg.norm(W - Q - s * B @ A) / norm).item())
    if not errors:
        raise ValueError("loftq found no bitsandbytes 4-bit LoRA layer: its input must be an nf4 / fp4 model")
    return errors


def prepare(model, p: StageSettings, input_ref: str | None):
    from ptqlib import artifacts

    if input_ref is None:
        raise ValueError("loftq needs input_ref (the nf4 / fp4 stage it trains on) to find the float weights")
    model = lora.prepare(model, p, input_ref)  # QLoRA's adapters on the bnb base
    errors = loftq_initialise(model, artifacts.float_model_dir(artifacts.input_of(input_ref)), iters=p.loftq_iter)
    if p.loftq_iter > 1:  # its base is saved at the end: keep its 4-bit weights in the stored layout meanwhile
        lora.keep_bnb_layout(model)
    before = sum(e[0] for e in errors.values()) / len(errors)
    after = sum(e[1] for e in errors.values()) / len(errors)
    print(f"LoftQ start on {len(errors)} layers ({p.loftq_iter} step(s)): mean ||W - Q|| / ||W|| {before:.4f} -> "
          f"||W - Q_T - sBA|| / ||W|| {after:.4f} (rank {p.rank})")
    return model


def save(model, tokenizer, p: StageSettings, output_dir, input_ref: str) -> dict:
    """QLoRA's save; at ``loftq_iter > 1`` the re-quantized base first, as its own bitsandbytes artifact in
    ``base/`` (the input's model with this model's 4-bit weights), which the adapter then sits on."""
    if p.loftq_iter == 1:
        return lora.save(model, tokenizer, p, output_dir, input_ref)
    from peft.tuners.lora.bnb import Linear4bit

    from ptqlib import artifacts
    from ptqlib.methods import bnb as bnb_method

    base_dir = Path(output_dir) / "base"
    mine = {n.removeprefix("base_model.model."): m.get_base_layer().weight
            for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    qs = next(iter(mine.values())).quant_state
    # the float model quantized afresh as the input stage did (transformers cannot save a 4-bit model it loaded
    # from a 4-bit checkpoint), its 4-bit weights then replaced by LoftQ's
    settings = SimpleNamespace(method=qs.quant_type, double_quant=qs.nested, blocksize=qs.blocksize)
    base, tok, _ = bnb_method.quantize(str(artifacts.float_model_dir(artifacts.input_of(input_ref))), settings)
    for name, mod in base.named_modules():
        if name in mine:
            mod.weight = mine[name]
    bnb_method.save(base, tok, settings, base_dir)  # writes base_dir/model
    artifacts.save(base_dir, {"type": "bnb", "path": "model", "method": qs.quant_type, "loftq_iter": p.loftq_iter},
                   input_ref)
    return lora.save(model, tokenizer, p, output_dir, str(base_dir))


register(FinetuneMethod("loftq", "QLoRA with the adapter started at the rank-r SVD of the quantization error",
                        needs="bnb", gives="adapter", prepare=prepare, save=save,
                        settings=("lr", "steps", "rank", "alpha", "loftq_iter"), label_keys=("loftq_iter",),
                        can_merge=True, options=LoftQOptions))

"""PiSSA and QPiSSA (Meng et al., "PiSSA: Principal Singular Values and Singular Vectors Adaptation of Large
Language Models", NeurIPS 2024, arXiv 2404.02948), the adapter start through peft (``init_lora_weights="pissa"``).

LoRA starts at ``B = 0`` and trains a small update beside a frozen ``W``; PiSSA puts the adapter on the
principal part of ``W`` and freezes the rest::

    W = U S V^T (out, in);   s B A = U_r S_r V_r^T   (B = U_r sqrt(S_r / s), A = sqrt(S_r / s) V_r^T)
    W_res = W - s B A        (the frozen base)

so at step 0 the model is the float model (up to rounding) and training moves the directions that carry most of
each weight. **QPiSSA** quantizes ``W_res`` instead of ``W`` (bitsandbytes NF4 with QLoRA's block 64 and double
quantization): the principal part, where a weight's largest values live, stays in 16 bits, and the quantization
error is the residual's only. It is the rival of PTQ -> QLoRA that starts from the float model.

Both change the base, which an adapter-only save does not carry: the float residual is kept while the stage
runs and saved in the stage (``base/``: the float residual for ``pissa``, its NF4 quantization, made again from
it, for ``qpissa``), and the adapter sits on it; ``merge: true`` folds the adapter into the (de-quantized)
residual. peft computes the SVD (``LoraLayer.pissa_init``); ptqlib only re-bases and saves.
"""
from __future__ import annotations

import shutil
import tempfile
import weakref
from pathlib import Path
from types import SimpleNamespace

from ptqlib.methods import FinetuneMethod, StageSettings, lora, register

_NF4 = SimpleNamespace(method="nf4", double_quant=True, blocksize=64)  # QLoRA's (and QPiSSA's paper's) NF4


def _pissa(model, p: StageSettings):
    """``model`` (float) with PiSSA adapters on its target layers; its base weights are now ``W_res``."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=p.rank, lora_alpha=p.alpha, lora_dropout=p.dropout, target_modules=list(p.target_modules),
                     task_type="CAUSAL_LM", init_lora_weights="pissa")
    return get_peft_model(model.float(), cfg)


def prepare(model, p: StageSettings, input_ref: str | None):
    """PiSSA's start; for qpissa its residual then quantized to NF4, the principal part copied into QLoRA's
    adapter on it. The float residual waits in a temp directory for :func:`save` (``_ptqlib_residual``)."""
    import torch
    from peft.tuners.lora import LoraLayer

    peft_model = _pissa(model, p)
    principal = {n.removeprefix("base_model.model."): (m.lora_A["default"].weight.detach().clone(),
                                                       m.lora_B["default"].weight.detach().clone())
                 for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}
    residual = Path(tempfile.mkdtemp(prefix="ptqlib-pissa-"))
    base = peft_model.unload()  # W_res, no adapter (peft_model is spent)
    base.save_pretrained(residual)
    if p.method == "qpissa":
        base = _nf4_residual(residual)
    out = lora.prepare(base, SimpleNamespace(**{**vars(p), "method": "qlora" if p.method == "qpissa" else "lora"}),
                       input_ref)
    with torch.no_grad():
        for n, m in out.named_modules():
            key = n.removeprefix("base_model.model.")
            if isinstance(m, LoraLayer) and key in principal:
                A, B = principal[key]
                m.lora_A["default"].weight.copy_(A.to(m.lora_A["default"].weight.dtype))
                m.lora_B["default"].weight.copy_(B.to(m.lora_B["default"].weight.dtype))
    out._ptqlib_residual = residual
    weakref.finalize(out, shutil.rmtree, residual, True)  # gone with the model if save never runs (a failed stage)
    return out


def _nf4_residual(residual: Path):
    """The float residual's bitsandbytes NF4 quantization (made from the saved residual: the same codes each time)."""
    from transformers import AutoModelForCausalLM

    from ptqlib import artifacts
    from ptqlib.methods.bnb import bnb_config

    return AutoModelForCausalLM.from_pretrained(residual, device_map=artifacts.default_device(),
                                                quantization_config=bnb_config("nf4", _NF4.double_quant, _NF4.blocksize))


def save(model, tokenizer, p: StageSettings, output_dir, input_ref: str) -> dict:
    """The base (``base/``: the float residual, or its NF4 codes for qpissa) as an artifact of its own, then the
    adapter on it (``lora.save``: merged into the de-quantized base with ``merge: true``)."""
    from ptqlib import artifacts
    from ptqlib.methods import bnb

    residual = model._ptqlib_residual
    base_dir = Path(output_dir) / "base"
    try:
        if p.method == "qpissa":
            bnb.save(_nf4_residual(residual), tokenizer, _NF4, base_dir)
            info = {"type": "bnb", "path": "model", "method": _NF4.method}
        else:
            shutil.copytree(residual, base_dir / "model")
            tokenizer.save_pretrained(base_dir / "model")
            info = {"type": "hf", "path": "model"}
    finally:
        shutil.rmtree(residual, ignore_errors=True)
    artifacts.save(base_dir, {**info, "residual_of": p.method}, input_ref)
    return lora.save(model, tokenizer, p, output_dir, str(base_dir))


_SETTINGS = ("lr", "steps", "rank", "alpha")
register(
    FinetuneMethod("pissa", "LoRA started at each weight's principal part, the residual frozen (peft PiSSA; float)",
                   needs="float", gives="adapter", prepare=prepare, save=save, settings=_SETTINGS, can_merge=True,
                   options=lora.MergeOptions),
    FinetuneMethod("qpissa", "PiSSA with the residual quantized to NF4 (a float input -> 4-bit base + adapter)",
                   needs="float", gives="quantized", prepare=prepare, save=save, settings=_SETTINGS,
                   keeps_adapter=True, grid="bnb", options=lora.MergeOptions),
)

"""Fine-tuning with transformers ``Trainer``: full, LoRA / QLoRA (peft), and ptqlib's adapters.

One entry point, :func:`prepare`, turns the input model into the trainable one for a method;
:func:`train` runs ``Trainer`` on SFT features (loss on the answer only) and returns the loss
history; :func:`save` writes the artifact the next stage loads (see ``ptqlib.artifacts``).
"""
from __future__ import annotations

import functools
import math
import tempfile
import time
from pathlib import Path

import torch

from ptqlib import artifacts
from ptqlib.data import collate
from ptqlib.record import peak_rss_mb

PEFT_METHODS = ("lora", "qlora")
BLORA_METHODS = ("qblora", "qalora", "qablora")


def count_trainable(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    tr = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return tr, sum(p.numel() for p in model.parameters())


def prepare(model, method: str, p: dict):
    """The trainable model for ``method`` (``p`` are the FinetuneParams as a dict)."""
    if method == "full":
        for prm in model.parameters():
            prm.requires_grad_(True)
        return model
    if method in PEFT_METHODS:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if getattr(model, "is_loaded_in_4bit", False):
            # casts norms to fp32 and enables input grads; gradient checkpointing only costs time here
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        from ptqlib.adapters.lora_quantlinear import register

        cfg = LoraConfig(r=p["rank"], lora_alpha=p["alpha"], lora_dropout=p["dropout"],
                         target_modules=list(p["target_modules"]), task_type="CAUSAL_LM")
        return get_peft_model(model, register(cfg))  # register: LoRA on QuantLinear (GPTQ/RTN base)
    if method == "l4q":
        from ptqlib.adapters.l4q import apply_l4q

        return apply_l4q(model, bits=p["bits"], group_size=p["group_size"], rank=p["rank"], alpha=p["alpha"],
                         target_modules=list(p["target_modules"]))
    if method == "qat_lora":
        from ptqlib.adapters.qat_lora import apply_qat_lora

        return apply_qat_lora(model, bits=p["bits"], group_size=p["group_size"], rank=p["rank"], alpha=p["alpha"],
                              target_modules=list(p["target_modules"]))
    if method in BLORA_METHODS:
        from ptqlib.adapters.blora import apply_adapter

        model = apply_adapter(model, method, rank=p["rank"], alpha=p["alpha"], pool=p["pool"] or None,
                              repeat=p["repeat"] or None, target_modules=list(p["target_modules"]))
        if method in ("qalora", "qablora") and p["group_size"] > 0:  # validated against the study; checked here
            layers = model.ptqlib_adapter_config["layers"]
            bad = {n: l["pool"] for n, l in layers.items() if l["pool"] != p["group_size"]}
            if bad:
                raise ValueError(f"group_size {p['group_size']} differs from the base's quantization group in "
                                 + ", ".join(f"{n} ({g})" for n, g in list(bad.items())[:3]))
        if getattr(model, "is_quantized", False):
            # transformers' Trainer refuses a bnb-quantized model unless it knows adapters are
            # attached; this flag is how its own adapter integration says so
            model._hf_peft_config_loaded = True
        return model
    raise ValueError(f"unknown fine-tuning method {method!r}")


def train(model, tokenizer, features: list[dict], p: dict, seed: int, progress: bool = False) -> dict:
    """Run Trainer for ``p['steps']`` optimizer steps -> {loss_history, metrics}."""
    from transformers import Trainer, TrainingArguments, set_seed

    set_seed(seed)
    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, max_steps=p["steps"], per_device_train_batch_size=p["batch_size"],
            gradient_accumulation_steps=p["grad_accum"], learning_rate=p["lr"], lr_scheduler_type="cosine",
            warmup_steps=int(p["warmup_ratio"] * p["steps"]), weight_decay=p["weight_decay"], logging_steps=1,
            save_strategy="no", report_to=[], seed=seed, data_seed=seed, use_cpu=not cuda,
            disable_tqdm=not progress, remove_unused_columns=False, dataloader_num_workers=0, optim="adamw_torch",
        )
        trainer = Trainer(model=model, args=args, train_dataset=features,
                          data_collator=functools.partial(collate, pad_id=tokenizer.pad_token_id))
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        trainer.train()
        secs = time.perf_counter() - t0
    hist = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    n_tok = sum(sum(1 for l in f["input_ids"]) for f in features)
    seen = p["steps"] * p["batch_size"] * p["grad_accum"]
    tokens = n_tok / len(features) * seen  # average tokens per example x examples seen
    trainable, total = count_trainable(model)
    metrics = {
        "train_seconds": secs, "train_tokens_per_s": tokens / secs, "step_seconds": secs / p["steps"],
        "train_loss_first": hist[0][1] if hist else math.nan,
        "train_loss_last": sum(l for _, l in hist[-5:]) / max(1, len(hist[-5:])) if hist else math.nan,
        "trainable_params": trainable, "total_params": total,
        "peak_mem_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_rss_mb(),
    }
    model.eval()
    return {"loss_history": hist, "metrics": metrics}


def _dequantized_copy(input_ref: str):
    """The input model with every quantized linear replaced by its de-quantized float weight.

    Used to merge a QLoRA adapter: peft would re-quantize a bnb layer on merge, and a GPTQ
    layer cannot absorb it; a float model is what a later PTQ stage needs anyway.
    """
    from ptqlib.models import plain_copy

    model, tok, _ = artifacts.load(input_ref)
    if getattr(model, "is_loaded_in_4bit", False):
        model = plain_copy(model.dequantize())
    else:
        from ptqlib.ptq import dequantize_model

        dequantize_model(model)
    return model.float(), tok


def save(model, tokenizer, method: str, p: dict, output_dir: str | Path, input_ref: str) -> dict:
    """Write the artifact of a fine-tuning stage; returns its artifact.json."""
    out = Path(output_dir)
    if method == "full":
        model.save_pretrained(out / "model")
        tokenizer.save_pretrained(out / "model")
        info = {"type": "hf", "path": "model"}
    elif method in PEFT_METHODS:
        model.save_pretrained(out / "adapter")
        if p["merge"]:
            from peft import PeftModel

            if method == "qlora":
                base, tok = _dequantized_copy(input_ref)
            else:
                base, tok, _ = artifacts.load(input_ref)
            merged = PeftModel.from_pretrained(base, out / "adapter").merge_and_unload()  # base is float here
            merged.save_pretrained(out / "model")
            tokenizer.save_pretrained(out / "model")
            info = {"type": "hf", "path": "model", "merged_from": "adapter"}
        else:
            info = {"type": "peft", "adapter": "adapter", "base": artifacts.base_ref(out, input_ref)}
    elif method == "l4q":
        from ptqlib.adapters.l4q import export_l4q
        from ptqlib.quant.checkpoint import save_quantized

        export_l4q(model)
        save_quantized(model, out / "model", tokenizer=tokenizer)
        info = {"type": "quant", "path": "model", "exported_from": "l4q"}
    elif method == "qat_lora":
        from ptqlib.adapters.qat_lora import save_exported

        save_exported(model, out / "model", out / "adapter", tokenizer=tokenizer)
        info = {"type": "qat_lora", "path": "model", "adapter": "adapter"}
    elif method in BLORA_METHODS:
        from ptqlib.adapters import blora

        blora.save_adapters(model, out / "adapter")
        if method in ("qalora", "qablora"):
            from ptqlib.quant.checkpoint import save_quantized

            blora.merge_adapters(model)
            save_quantized(model, out / "model", tokenizer=tokenizer)
            info = {"type": "quant", "path": "model", "merged_from": "adapter"}
        else:
            info = {"type": "blora", "adapter": "adapter", "base": artifacts.base_ref(out, input_ref)}
    else:
        raise ValueError(f"unknown fine-tuning method {method!r}")
    artifacts.save(out, info)
    return info

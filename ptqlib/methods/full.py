"""Full fine-tuning: every parameter trains (the 16-bit reference of the PTQ-QLoRA study)."""
from __future__ import annotations

from pathlib import Path

from ptqlib.methods import FinetuneMethod, StageSettings, register


def prepare(model, p: StageSettings, input_ref: str):
    for prm in model.parameters():
        prm.requires_grad_(True)
    return model


def save(model, tokenizer, p: StageSettings, output_dir, input_ref: str) -> dict:
    out = Path(output_dir)
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    return {"type": "hf", "path": "model"}


register(FinetuneMethod("full", "every weight trains (float input, float output)", needs="float", gives="float",
                        prepare=prepare, save=save, settings=("lr", "steps", "batch_size"), draws_init=False))

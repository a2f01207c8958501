"""The finetune stage: transformers ``Trainer`` around the registered method's ``prepare`` and ``save``.

:func:`prepare` turns the input model into the trainable one for a method (a module of ``ptqlib.methods``;
``python -m ptqlib methods`` lists them); :func:`train` runs ``Trainer`` on SFT
features (loss on the answer only) and returns the loss history; :func:`save` writes the artifact
the next stage loads (see ``ptqlib.artifacts``).
"""
from __future__ import annotations

import contextlib
import functools
import math
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ptqlib import artifacts
from ptqlib.data import collate
from ptqlib.engine.record import peak_rss_mb
from ptqlib.quant.qlinear import kept_dequantized
from ptqlib.stages.sft_loss import LabelledRowsHead, causal_lm_loss, shifted_targets

if TYPE_CHECKING:
    from ptqlib.study.params import FinetuneParams


def count_trainable(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    tr = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return tr, sum(p.numel() for p in model.parameters())


def prepare(model, method: str, p: FinetuneParams, input_ref: str | None = None, seed: int = 0):
    """The trainable model for ``method`` (``p``: the FinetuneParams as a dict; ``input_ref``: where
    ``model`` was loaded from, for methods that read more of their input than its weights).

    The adapter's initial weights are drawn from ``derive_seed(seed, "finetune", method, "init")``
    (``ptqlib.seeding``): a function of the pipeline seed and the stage, not of what the process did
    before, and a draw of its own beside the training run's data order and dropout (``train``)."""
    from ptqlib.methods import finetune_method
    from ptqlib.seeding import derive_seed, seed_all
    from ptqlib.study.kinds import as_params

    seed_all(derive_seed(seed, "finetune", method, "init"))
    return finetune_method(method).prepare(model, as_params("finetune", p), input_ref)


def train(model, tokenizer, features: list[dict], p: FinetuneParams, seed: int, progress: bool = False,
          callbacks: list | None = None, labelled_loss: bool = True) -> dict:
    """Run Trainer for ``p.steps`` optimizer steps -> {loss_history, metrics}.

    ``callbacks``: extra ``transformers.TrainerCallback`` objects (``bench/stage_speed.py`` times steps).
    ``labelled_loss``: take the loss over the labelled tokens only (``ptqlib.stages.sft_loss``), with
    bf16 autocast around the forward and the loss, so the logits stay bf16 until their labelled rows
    are selected, and under bf16 the output head run on those rows only; ``False`` is transformers' own
    path (the model's loss over every position; under ``bf16`` accelerate's autocast, which casts the
    whole ``(B, L, vocab)`` logits to fp32). In fp32 both give the same weights bit for bit, in bf16
    the same to rounding (``tests/stages/test_sft_loss.py``); the default is faster."""
    from transformers import Trainer, set_seed

    from ptqlib.precision import attention_kernels, resolve
    from ptqlib.study.kinds import as_params

    p = as_params("finetune", p)
    precision = resolve(p.precision)  # bf16: autocast, fp32 master weights and AdamW state (Trainer's bf16)
    cuda = torch.cuda.is_available()
    if p.steps == 0:  # the method's start alone (a training-free correction): nothing to train
        model.eval()
        return {"loss_history": [], "metrics": _train_metrics(model, features, p, [], 0.0, precision, cuda)}
    set_seed(seed)
    # bf16: the head on the labelled rows only (fp32 keeps every row: transformers' weights, bit for bit)
    rows = LabelledRowsHead(model, torch.bfloat16) if labelled_loss and precision == "bf16" else None
    with tempfile.TemporaryDirectory() as tmp:
        args = _training_args(p, seed, tmp, precision, labelled_loss, progress, cuda)
        trainer_cls, loss = (_labelled_loss_trainer(precision, rows, cuda), causal_lm_loss) if labelled_loss \
            else (Trainer, None)
        trainer = trainer_cls(model=model, args=args, train_dataset=features,
                              data_collator=functools.partial(collate, pad_id=tokenizer.pad_token_id),
                              callbacks=callbacks, compute_loss_func=loss)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        with rows or contextlib.nullcontext(), attention_kernels("cuda" if cuda else "cpu"), \
                kept_dequantized(model, p.base_cache) as held:
            trainer.train()
        secs = time.perf_counter() - t0
    hist = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    model.eval()
    metrics = _train_metrics(model, features, p, hist, secs, precision, cuda)
    metrics["base_cache_mb"] = held[0] / 2**20  # what keeping a quantized base's float weights cost (0: nothing kept)
    return {"loss_history": hist, "metrics": metrics}


def _training_args(p: FinetuneParams, seed: int, output_dir: str, precision: str, labelled_loss: bool,
                   progress: bool, cuda: bool):
    """transformers ``TrainingArguments`` for ``p``: cosine schedule, no checkpoints, Trainer's seed and data_seed."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=output_dir, max_steps=p.steps, per_device_train_batch_size=p.batch_size,
        gradient_accumulation_steps=p.grad_accum, learning_rate=p.lr, lr_scheduler_type="cosine",
        warmup_steps=int(p.warmup_ratio * p.steps), weight_decay=p.weight_decay, logging_steps=1,
        save_strategy="no", report_to=[], seed=seed, data_seed=seed, use_cpu=not cuda,
        disable_tqdm=not progress, remove_unused_columns=False, dataloader_num_workers=0,
        # bf16, the fast path: AdamW in one fused kernel (SmolLM2's full-FT step: 0.08 s instead of
        # 0.23-0.56 s on CPU); it rounds differently in float32's last place (3e-8 after 4 steps),
        # far below bf16's own rounding. fp32, the exact path, keeps torch's per-tensor AdamW.
        optim="adamw_torch_fused" if precision == "bf16" else "adamw_torch",
        bf16=precision == "bf16" and not labelled_loss,
    )


def _labelled_loss_trainer(precision: str, rows, cuda: bool):
    """A ``Trainer`` whose loss covers the labelled tokens only, under our autocast (``rows``: the bf16
    head on the labelled rows, or None)."""
    from transformers import Trainer

    from ptqlib.precision import autocast

    class LabelledLossTrainer(Trainer):
        def autocast_smart_context_manager(self, cache_enabled: bool | None = True):
            # the autocast accelerate would wrap the forward in, without its cast of the outputs to fp32
            return autocast(precision, "cuda" if cuda else "cpu")

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if rows is None:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            rows.keep = shifted_targets(inputs["labels"])[1]
            try:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            finally:
                rows.keep = None

    return LabelledLossTrainer


def _train_metrics(model, features: list[dict], p: FinetuneParams, hist: list, secs: float, precision: str,
                   cuda: bool) -> dict:
    """The finetune stage's training metrics: time, tokens/s, losses (last: the mean of the last 5 logged),
    trainable and total parameters, peak memory, precision."""
    n_tok = sum(sum(1 for l in f["input_ids"]) for f in features)
    seen = p.steps * p.batch_size * p.grad_accum
    tokens = n_tok / len(features) * seen if features else 0.0  # average tokens per example x examples seen
    trainable, total = count_trainable(model)
    return {
        "train_seconds": secs, "train_tokens_per_s": tokens / secs if secs else math.nan,
        "step_seconds": secs / p.steps if p.steps else math.nan,
        "train_loss_first": hist[0][1] if hist else math.nan,
        "train_loss_last": sum(l for _, l in hist[-5:]) / max(1, len(hist[-5:])) if hist else math.nan,
        "trainable_params": trainable, "total_params": total,
        "peak_mem_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_rss_mb(),
        "precision": precision,
    }


def save(model, tokenizer, method: str, p: FinetuneParams, output_dir: str | Path, input_ref: str) -> dict:
    """Write the artifact of a fine-tuning stage (the method's layout); returns its artifact.json."""
    from ptqlib.methods import finetune_method
    from ptqlib.study.kinds import as_params

    info = finetune_method(method).save(model, tokenizer, as_params("finetune", p), output_dir, input_ref)
    artifacts.save(output_dir, info, input_ref)
    return info

"""The parameters of each stage kind: one dataclass per kind, validated in ``__post_init__``.

Their field comments are the documentation (the notebooks' parameters cells carry the same names);
``id_params`` says which values enter a stage's id. Errors are ``ConfigError`` naming the key, the bad
value and what is valid. A study file's schema, grids and selections are ``ptqlib.study.schema``.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ptqlib.errors import ConfigError
from ptqlib.methods import finetune_methods, quantize_methods
from ptqlib.precision import PRECISIONS
from ptqlib.quant.grid import GROUP_GRIDS, POOL_NORMS, SYM_GRIDS
from ptqlib.study.neutral import ID_NEUTRAL

DEFAULT_FT_GROUP = 64  # the group of a method with its own grid (l4q, qat_lora) when group_size is left at 0


def _choice(name: str, value: Any, valid) -> None:
    if value not in valid:
        raise ConfigError(f"{name}: {value!r} is not valid; valid: {', '.join(map(str, valid))}")


def _positive(name: str, value: Any, kind=int) -> None:
    # value <= 0 is False for NaN, and inf is positive: neither is a learning rate or a scale
    if (isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int) or not value > 0
            or not math.isfinite(value)):
        raise ConfigError(f"{name}: {value!r} must be a positive {'finite number' if kind is float else 'integer'}")


@dataclass
class QuantizeParams:
    """Post-training quantization of the input model (weights only)."""

    method: str = "rtn"  # a registered quantization method: rtn, gptq, nf4, fp4 (python -m ptqlib methods)
    bits: int = 4  # weight bits: rtn/gptq 2, 3, 4, 8; nf4/fp4 4
    group_size: int = 64  # rtn/gptq: input columns per scale/zero (-1: the whole row); must divide every layer's input size
    sym: bool = False  # rtn/gptq: symmetric grid (zero fixed at 2^(b-1))
    sym_grid: str = "full"  # rtn/gptq with sym: full: scale 2 max|w| / (2^b - 1), every code used (GPTQ reference); max: scale max|w| / (2^(b-1) - 1), +-max exact (ptqlib before)
    group_grid: str = "lazy"  # gptq without act-order: a group's grid from the lazily updated weights (lazy, the reference's codes) or the block's error-updated copy (updated, ptqlib before)
    double_quant: bool = True  # nf4/fp4: quantize the absmax constants too (QLoRA's default)
    blocksize: int = 64  # nf4/fp4: bitsandbytes block size
    act_order: bool = False  # gptq: quantize columns in order of decreasing Hessian diagonal
    static_groups: bool = True  # gptq: with act_order, fix the group grids before permuting
    true_sequential: bool = True  # gptq: [qkv] -> [o] -> [up, gate] -> [down] inside each block
    damp: float = 0.01  # gptq: dampening, as a fraction of the mean Hessian diagonal
    block_size: int = 128  # gptq: columns per lazy batch update
    calib_samples: int = 32  # gptq: calibration windows of pydoc train text
    calib_seq_len: int = 256  # gptq: tokens per calibration window
    calib_seed: int = -1  # gptq: which calibration windows (-1: the pipeline's seed, so each seed is its own GPTQ draw)
    precision: str = "auto"  # auto | fp32 | bf16: calibration forwards (ptqlib.precision; auto: bf16 where the hardware computes it)

    def __post_init__(self) -> None:
        _choice("method", self.method, quantize_methods())
        if self.bits not in quantize_methods()[self.method].bits:
            raise ConfigError(
                f"bits: {self.bits!r} is not supported by method {self.method!r}; valid: "
                + ", ".join(map(str, quantize_methods()[self.method].bits))
            )
        if self.group_size != -1:
            _positive("group_size", self.group_size)
        _positive("blocksize", self.blocksize)
        _positive("calib_samples", self.calib_samples)
        _positive("calib_seq_len", self.calib_seq_len)
        _positive("block_size", self.block_size)
        _choice("sym_grid", self.sym_grid, SYM_GRIDS)
        _choice("group_grid", self.group_grid, GROUP_GRIDS)
        if not 0 < self.damp < 1:
            raise ConfigError(f"damp: {self.damp!r} must be in (0, 1)")
        if isinstance(self.calib_seed, bool) or not isinstance(self.calib_seed, int) or self.calib_seed < -1:
            raise ConfigError(f"calib_seed: {self.calib_seed!r} must be -1 (the pipeline's seed) or an integer >= 0")
        _choice("precision", self.precision, PRECISIONS)


@dataclass
class FinetuneParams:
    """Training on the task's train split (loss on the answer only), with transformers Trainer."""

    method: str = "lora"  # a registered fine-tuning method: full, lora, qlora, l4q, ... (python -m ptqlib methods lists them)
    steps: int = 40  # optimizer steps
    lr: float = 2e-4  # peak learning rate (cosine schedule)
    warmup_ratio: float = 0.1  # share of steps for linear warm-up
    weight_decay: float = 0.0  # AdamW weight decay
    batch_size: int = 4  # examples per step
    grad_accum: int = 1  # gradient accumulation steps
    max_length: int = 256  # tokens per example (prompt cut from the left)
    train_samples: int = 256  # examples of the task's train split
    rank: int = 8  # adapter rank r (qblora/qablora raise it at equal parameters)
    alpha: float = 16.0  # adapter scale numerator (the scale s is alpha / r)
    dropout: float = 0.0  # LoRA dropout
    target_modules: list = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])  # layers that get adapters
    merge: bool = False  # lora/qlora/loftq: merge the adapter into (de-quantized) weights -> a float model
    bits: int = 4  # l4q/qat_lora: weight bits
    group_size: int = 0  # l4q/qat_lora: quantization group (0: 64, -1: the whole row); qalora/qablora: as the quantized base (0: take it from the base; another value is an error); other methods: leave 0
    pool: int = 0  # qblora/qablora: input pool factor (0: the method's default)
    repeat: int = 0  # qblora/qablora: output repeat factor (0: the method's default)
    pool_norm: str = "mean"  # qblora/qalora/qablora: reduce a pooled block by its mean (official code) or sum (QA-LoRA's Algorithm 1; the mean at alpha x pool)
    precision: str = "auto"  # auto | fp32 | bf16: bf16 autocast with fp32 master weights and optimizer state (auto: bf16 where the hardware computes it)

    def __post_init__(self) -> None:
        _choice("method", self.method, finetune_methods())
        m = finetune_methods()[self.method]
        for k in ("steps", "batch_size", "grad_accum", "max_length", "train_samples", "rank"):
            _positive(k, getattr(self, k))
        _positive("lr", self.lr, float)
        _positive("alpha", self.alpha, float)
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio: {self.warmup_ratio!r} must be in [0, 1)")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout: {self.dropout!r} must be in [0, 1)")
        if m.bits:
            _choice("bits", self.bits, m.bits)
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < -1:
            raise ConfigError(f"group_size: {self.group_size!r} must be -1, 0 (the method's default) or a positive integer")
        if self.group_size and not m.group:
            grouped = [n for n, e in finetune_methods().items() if e.group]
            raise ConfigError(f"group_size: {self.group_size!r} has no effect on method {self.method!r}; it applies to "
                              f"{', '.join(grouped)} only (leave it out)")
        if m.group == "own" and self.group_size == 0:
            self.group_size = DEFAULT_FT_GROUP
        _choice("precision", self.precision, PRECISIONS)
        _choice("pool_norm", self.pool_norm, POOL_NORMS)
        if self.pool_norm != "mean" and "pool_norm" not in m.settings:
            pooled = [n for n, e in finetune_methods().items() if "pool_norm" in e.settings]
            raise ConfigError(f"pool_norm: {self.pool_norm!r} has no effect on method {self.method!r}; it applies to "
                              f"{', '.join(pooled)} only (leave it out)")
        if not isinstance(self.target_modules, list) or not self.target_modules:
            raise ConfigError(f"target_modules: {self.target_modules!r} must be a non-empty list of layer names")
        if self.merge and not m.can_merge:
            mergeable = [n for n, e in finetune_methods().items() if e.can_merge]
            raise ConfigError(f"merge: only {', '.join(mergeable)} adapters merge into a float model, not {self.method!r}")


RUNTIMES = ("torch", "llama.cpp")


@dataclass
class EvaluateParams:
    """Held-out perplexity, task accuracy from greedy generation, size and speed."""

    ppl_samples: int = 32  # held-out windows per perplexity source (2 sources: 64 x ppl_seq_len tokens in all)
    ppl_seq_len: int = 256  # tokens per window
    ppl_windows: str = "random"  # random: non-overlapping windows at seeded random positions over all held-out topics / modules (clustered by document in the claims); first: the first consecutive windows (before)
    kl_reference: bool = True  # KL divergence and top-1 agreement of next-token distributions vs the pipeline's 16-bit reference (the input of its first quantizing stage) on the perplexity windows; off where nothing quantizes and for llama.cpp
    ppl_sources: list = field(default_factory=lambda: ["pydoc", "stdlib"])  # held-out text: pydoc (language reference -> ppl), stdlib (library source code -> ppl_stdlib); [] for no perplexity
    task_samples: int = 128  # held-out task examples generated greedily
    split: str = "test"  # test | validation: which held-out task examples are generated (validation: for select)
    max_new_tokens: int = 64  # generation length limit
    batch_size: int = 32  # generation / perplexity batch size
    lm_eval_tasks: list = field(default_factory=list)  # lm-eval tasks or presets (mmlu, commonsense); needs the lmeval extra
    lm_eval_fewshot: int = -1  # lm-eval few-shot examples (-1: the task's default; MMLU is usually 5)
    lm_eval_limit: int = 0  # lm-eval examples per task (0: all)
    lm_eval_include: str = ""  # a directory of local lm-eval task YAML files
    runtime: str = "torch"  # torch (the model as loaded) | llama.cpp (export to GGUF, score the file in llama.cpp)
    gguf_type: str = "auto"  # llama.cpp runtime: GGUF weight type (auto keeps the codes: Q4_1 / Q8_0; q4_1, q8_0, f16)
    gguf_lossy: bool = False  # llama.cpp runtime: allow re-quantizing layers GGUF cannot hold exactly (NF4, act-order, g16)
    speed_prompts: int = 0  # batch-1 latency: time to first token and decode tokens/s over this many prompts (0: off)
    speed_tokens: int = 64  # tokens decoded per speed prompt (EOS ignored)
    precision: str = "auto"  # auto | fp32 | bf16: the model's float weights for perplexity and generation (auto: bf16 where the hardware computes it)

    def __post_init__(self) -> None:
        _choice("precision", self.precision, PRECISIONS)
        _choice("ppl_windows", self.ppl_windows, ("random", "first"))  # ptqlib.data.WINDOW_LAYOUTS (torch-free here)
        if self.runtime not in RUNTIMES:
            raise ConfigError(f"runtime: {self.runtime!r} is not a runtime; valid: {', '.join(RUNTIMES)}")
        from ptqlib.deploy.types import TYPES as GGUF_TYPES

        if self.gguf_type not in GGUF_TYPES:
            raise ConfigError(f"gguf_type: {self.gguf_type!r}; valid: {', '.join(GGUF_TYPES)}")
        if self.runtime != "llama.cpp" and (self.gguf_type != "auto" or self.gguf_lossy):
            raise ConfigError(f"gguf_type / gguf_lossy apply to runtime llama.cpp only (runtime is {self.runtime!r})")
        if self.runtime == "llama.cpp" and self.lm_eval_tasks:
            raise ConfigError("lm_eval_tasks run on the torch model; with runtime llama.cpp leave them empty")
        if not isinstance(self.speed_prompts, int) or self.speed_prompts < 0:
            raise ConfigError(f"speed_prompts: {self.speed_prompts!r} must be an integer >= 0")
        _positive("speed_tokens", self.speed_tokens)
        if not isinstance(self.lm_eval_tasks, list) or not all(isinstance(t, str) for t in self.lm_eval_tasks):
            raise ConfigError(f"lm_eval_tasks: {self.lm_eval_tasks!r} must be a list of task names")
        if self.lm_eval_include and not Path(self.lm_eval_include).expanduser().is_dir():
            raise ConfigError(f"lm_eval_include: {self.lm_eval_include!r} is not a directory")
        for k in ("ppl_samples", "ppl_seq_len", "max_new_tokens", "batch_size"):
            _positive(k, getattr(self, k))
        from ptqlib.text import TEXT_SOURCES

        if (not isinstance(self.ppl_sources, list)
                or any(s not in TEXT_SOURCES for s in self.ppl_sources) or len(set(self.ppl_sources)) < len(self.ppl_sources)):
            raise ConfigError(f"ppl_sources: {self.ppl_sources!r} must be a list of distinct text sources ([] for no "
                              f"perplexity); valid: {', '.join(TEXT_SOURCES)}")
        if not isinstance(self.task_samples, int) or self.task_samples < 0:
            raise ConfigError(f"task_samples: {self.task_samples!r} must be an integer >= 0")
        if not self.ppl_sources and not self.task_samples and not self.lm_eval_tasks and not self.speed_prompts:
            raise ConfigError("the evaluate stage measures nothing: ppl_sources is [] and task_samples is 0 "
                              "(give a text source, task examples, lm_eval_tasks or speed_prompts)")
        _choice("split", self.split, ("test", "validation"))


def from_namespace(cls, ns: dict):
    """A stage notebook's parameters as the validated ``cls``: every field read from ``ns`` (the
    notebook's globals, where papermill injected them). One call instead of each notebook listing the
    fields again: a listed copy once dropped ``sym_grid`` / ``group_grid``, so a study's value was
    silently replaced by the default."""
    names = [f.name for f in dataclasses.fields(cls)]
    missing = [n for n in names if n not in ns]
    if missing:
        raise ConfigError(f"{cls.__name__}: the notebook defines no {', '.join(missing)} (add them to its parameters cell)")
    return cls(**{n: copy.deepcopy(ns[n]) for n in names})


def id_params(kind: str, params: dict) -> dict:
    """The params that enter a stage's id: all, less ``ID_NEUTRAL`` values and grid rules that
    cannot act (``sym_grid`` of an asymmetric or NF4 run, ``group_grid`` of a GPTQ run without
    dynamic groups), so adding those rules re-ran only the stages whose codes they change."""
    neutral = ID_NEUTRAL.get(kind, {})
    out = {k: v for k, v in params.items() if not (k in neutral and neutral[k] == v)}
    if kind == "quantize":
        if params.get("method") not in ("rtn", "gptq") or not params.get("sym"):
            out.pop("sym_grid", None)
        dynamic = params.get("group_size") != -1 and not (params.get("act_order") and params.get("static_groups"))
        if params.get("method") != "gptq" or not dynamic:
            out.pop("group_grid", None)
        if params.get("method") in quantize_methods() and not quantize_methods()[params["method"]].calibration:
            out.pop("precision", None)  # only calibration forwards run at the stage's precision
    if kind == "evaluate" and params.get("runtime") == "llama.cpp":
        out.pop("precision", None)  # llama.cpp computes in its own types
    return out




LIST_KEYS = {"target_modules", "lm_eval_tasks", "ppl_sources"}  # list-valued by nature: never a grid axis


def fields_of(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}

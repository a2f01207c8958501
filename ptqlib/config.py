"""Study files: load, validate, expand grids.

A study file (``parameters/<study>.yaml``)::

    study: default                 # name of reports/<study>/
    model: smollm2-135m            # or a list -> grid
    task: meetings                 # fine-tuning and task-evaluation data
    seeds: [0, 1]                  # a grid axis for every stage that trains
    defaults:                      # per stage kind, merged under each stage's own keys
      finetune: {steps: 40, lr: 2.0e-4}
    pipelines:
      base: []                     # evaluate the model as it is
      ft16: [{finetune: full}]     # shorthand for {finetune: {method: full}}
      ft_nf4_qlora:
        - finetune: {method: full, lr: 2.0e-5}
        - quantize: {method: nf4}
        - finetune: {method: qlora}

Every pipeline ends with an implicit ``evaluate`` stage; a last entry ``{evaluate: {...}}``
overrides ``defaults.evaluate`` for that pipeline (e.g. ``runtime: llama.cpp``). A list value in a stage (``bits: [3, 4]``)
expands the pipeline into a grid, except for keys whose value is a list by nature
(``target_modules``). The parameters of each stage kind are the dataclasses below: their
field comments are the documentation, and ``__post_init__`` validates each value.
A finetune setting given as ``{select: [candidates], metric: field_f1}`` (in a stage or in
``defaults.finetune``; one per pipeline) is chosen on the task's validation split: each candidate
trains at the first seed and is scored on validation (pipelines ``<name>~select[lr=...]``), and
the best one is the value of the pipeline's test-set runs (all seeds). See ``ptqlib.selection``.
Errors are ``ConfigError`` naming file, key, bad value and what is valid, raised before any stage runs.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ptqlib.errors import ConfigError
from ptqlib.methods import finetune_methods, quantize_methods
from ptqlib.metrics import evaluate_metric_names, known_evaluate_metric
from ptqlib.neutral import ID_NEUTRAL  # re-exported: config.ID_NEUTRAL
from ptqlib.precision import PRECISIONS
from ptqlib.quant.grid import GROUP_GRIDS, SYM_GRIDS

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
    group_size: int = 64  # rtn/gptq: input columns per scale/zero (-1 = whole row); must divide every layer's input size
    sym: bool = False  # rtn/gptq: symmetric grid (zero fixed at 2^(b-1))
    sym_grid: str = "full"  # rtn/gptq with sym: full = scale 2 max|w| / (2^b - 1), every code used (GPTQ reference); max = max|w| / (2^(b-1) - 1), +-max exact (ptqlib before)
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
    precision: str = "auto"  # auto | fp32 | bf16: calibration forwards (ptqlib.precision; auto = bf16 where the hardware computes it)

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
    alpha: float = 16.0  # adapter scale numerator (s = alpha / r)
    dropout: float = 0.0  # LoRA dropout
    target_modules: list = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])  # layers that get adapters
    merge: bool = False  # lora/qlora/loftq: merge the adapter into (de-quantized) weights -> a float model
    bits: int = 4  # l4q/qat_lora: weight bits
    group_size: int = 0  # l4q/qat_lora: quantization group (0 = 64, -1 = whole row); qalora/qablora: as the quantized base (0 = take it from the base; another value is an error); other methods: leave 0
    pool: int = 0  # qblora/qablora: input pool factor (0 = the method's default)
    repeat: int = 0  # qblora/qablora: output repeat factor (0 = the method's default)
    pool_norm: str = "mean"  # qblora/qalora/qablora: reduce a pooled block by its mean (official code) or sum (QA-LoRA's Algorithm 1; = mean at alpha x pool)
    precision: str = "auto"  # auto | fp32 | bf16: bf16 autocast with fp32 master weights and optimizer state (auto = bf16 where the hardware computes it)

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
        _choice("pool_norm", self.pool_norm, ("mean", "sum"))  # ptqlib.adapters.balanced.POOL_NORMS (torch-free here)
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
    precision: str = "auto"  # auto | fp32 | bf16: the model's float weights for perplexity and generation (auto = bf16 where the hardware computes it)

    def __post_init__(self) -> None:
        _choice("precision", self.precision, PRECISIONS)
        _choice("ppl_windows", self.ppl_windows, ("random", "first"))  # ptqlib.data.WINDOW_LAYOUTS (torch-free here)
        if self.runtime not in RUNTIMES:
            raise ConfigError(f"runtime: {self.runtime!r} is not a runtime; valid: {', '.join(RUNTIMES)}")
        from ptqlib.deploy.gguf import TYPES as GGUF_TYPES

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
        from ptqlib.data import TEXT_SOURCES

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


STAGE_PARAMS = {"quantize": QuantizeParams, "finetune": FinetuneParams, "evaluate": EvaluateParams}


def as_params(kind: str, p):
    """The typed, validated params of a stage kind from a dataclass (returned as it is) or a dict
    (a stage record's ``params``, or a few keys with the rest defaulted): what the stage code takes."""
    cls = STAGE_PARAMS[kind]
    if isinstance(p, cls):
        return p
    if isinstance(p, dict):
        return cls(**p)
    raise TypeError(f"{kind} params must be a {cls.__name__} or a dict, got {type(p).__name__}")
LIST_KEYS = {"target_modules", "lm_eval_tasks", "ppl_sources"}  # list-valued by nature: never a grid axis
TOP_KEYS = {"study", "description", "model", "task", "seeds", "defaults", "pipelines", "claims", "executor"}
# the `executor:` section (run --executor slurm): where and with what resources each stage job runs
EXECUTOR_KEYS = {"partition": "SLURM partition", "account": "SLURM account", "qos": "SLURM QOS",
                 "time_min": "minutes per stage job", "gpus": "GPUs per stage job", "cpus": "CPU cores per stage job",
                 "mem_gb": "memory per stage job (GB)", "constraint": "SLURM node constraint"}
CLAIM_KEYS = {"claim", "a", "b", "metric", "relation", "min_effect"}


@dataclass
class Stage:
    kind: str  # quantize | finetune | evaluate
    params: dict  # validated, complete (defaults filled in)


@dataclass
class Pipeline:
    """One pipeline at one grid point: its stages in order (the last one is evaluate)."""

    name: str  # e.g. "ft_rtn[bits=3,seed=1]"
    family: str  # the pipeline's name in the study file
    model: str
    task: str
    seed: int
    grid: dict  # the grid values of this point
    stages: list[Stage]


@dataclass
class Study:
    name: str
    path: Path
    description: str
    pipelines: list[Pipeline]
    claims: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what validation could not check (dry-run, uncached hub model)
    executor: dict = field(default_factory=dict)  # the `executor:` section (EXECUTOR_KEYS)
    selections: list = field(default_factory=list)  # ptqlib.selection.Selection: each select, per grid point


def _where(path, *keys) -> str:
    return f"{path}: " + ".".join(str(k) for k in keys if k != "")


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _check_keys(path, where: str, given: dict, valid) -> None:
    for k in given:
        if k not in valid:
            import difflib

            near = difflib.get_close_matches(str(k), list(valid), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ConfigError(f"{path}: {where}: unknown key {k!r}{hint}; valid: {', '.join(sorted(valid))}")


def _normalise_stage(path, where: str, entry) -> tuple[str, dict]:
    if not isinstance(entry, dict) or len(entry) != 1:
        raise ConfigError(f"{path}: {where}: a stage is a one-key mapping such as {{quantize: nf4}}, got {entry!r}")
    (kind, params), = entry.items()
    if kind not in ("quantize", "finetune", "evaluate"):
        raise ConfigError(f"{path}: {where}: unknown stage {kind!r}; valid: quantize, finetune, and evaluate "
                          "as the last entry (it is implicit; the entry overrides defaults.evaluate)")
    if isinstance(params, str):
        params = {"method": params}
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise ConfigError(f"{path}: {where}.{kind}: expected a mapping or a method name, got {params!r}")
    _check_keys(path, f"{where}.{kind}", params, _fields(STAGE_PARAMS[kind]))
    return kind, params


def _grid(items: dict) -> list[dict]:
    """Cartesian product over the list values of ``items`` (a dict of key -> value or list)."""
    axes = {k: v for k, v in items.items() if isinstance(v, list)}
    if not axes:
        return [{}]
    return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]


def _build(cls, path, where: str, params: dict):
    try:
        return cls(**params)
    except ConfigError as e:
        raise ConfigError(f"{path}: {where}.{e}") from None
    except TypeError as e:
        raise ConfigError(f"{path}: {where}: {e}") from None


def _check_types(cls, path, where: str, params: dict) -> None:
    for k, v in params.items():
        default = _fields(cls)[k].default
        if default is dataclasses.MISSING or v is None:
            continue
        ok = (isinstance(v, type(default)) or (isinstance(default, float) and isinstance(v, int))) and not (
            isinstance(v, bool) and not isinstance(default, bool))
        if not ok:
            raise ConfigError(
                f"{path}: {where}.{k}: {v!r} has type {type(v).__name__}; expected {type(default).__name__}"
            )


def claim_metric(metric: str) -> bool:
    """A column results.csv will have: an evaluate metric (``metrics.evaluate_metric_names``) or a
    stage's (``finetune.train_loss_last``, ``quantize2.quant_seconds``)."""
    return known_evaluate_metric(metric) or re.fullmatch(r"(quantize|finetune)\d*\.\w+", metric) is not None


def quantizes(stage: Stage) -> bool:
    """Does the stage make a quantized model from a float one (PTQ, or a method that trains into a grid)?"""
    if stage.kind == "quantize":
        return True
    return stage.kind == "finetune" and finetune_methods()[stage.params["method"]].gives in ("quantized", "merged")


def _at(point: dict, i: int, params: dict, key: str):
    """Stage ``i``'s value of ``key`` at a grid ``point`` (else its params', else the default)."""
    default = _fields(QuantizeParams)[key].default
    return point.get(f"{i}.{key}", params.get(key, default))


def _resolve(path, where: str, kind: str, p: dict, seed: int) -> dict:
    """Values that depend on the pipeline or the machine, made concrete for the stage id and record:
    ``precision: auto`` -> fp32 / bf16 (``ptqlib.precision``); ``calib_seed: -1`` -> the pipeline's
    seed where the method calibrates, 0 (unread) where it does not (the id such stages always had)."""
    from ptqlib.precision import resolve

    try:
        p["precision"] = resolve(p["precision"])
    except ConfigError as e:
        raise ConfigError(f"{path}: {where}.{e}") from None
    if kind == "quantize" and p["calib_seed"] == -1:
        p["calib_seed"] = seed if quantize_methods()[p["method"]].calibration else 0
    return p


SELECT_KEYS = {"select", "metric"}


def _check_selects(path, where: str, kind: str, params: dict) -> None:
    """Validate each ``{select: [...], metric: ...}`` value of a stage's (or defaults') params."""
    for k, v in params.items():
        if not isinstance(v, dict):
            continue
        w = f"{path}: {where}.{k}"
        if kind != "finetune":
            raise ConfigError(f"{w}: {v!r}: only finetune settings can be selected, not {kind} settings")
        if set(v) - SELECT_KEYS or "select" not in v:
            raise ConfigError(f"{w}: {v!r} is not a value; give a value, a list (a grid) or "
                              "{select: [candidates], metric: <metric>} (keys: select, metric)")
        scalar = [f for f, fd in _fields(FinetuneParams).items()
                  if f not in LIST_KEYS and f != "method" and fd.default is not dataclasses.MISSING]
        if k not in scalar:
            raise ConfigError(f"{w}: {k!r} cannot be selected (a method is a pipeline of its own; a list setting "
                              f"is not a scalar); valid: {', '.join(scalar)}")
        cands = v["select"]
        if not isinstance(cands, list) or not cands:
            raise ConfigError(f"{w}.select: {cands!r} must be a non-empty list of candidate values")
        default = _fields(FinetuneParams)[k].default
        for c in cands:  # the values themselves are validated with the pipeline (FinetuneParams)
            if c is None or not ((isinstance(c, type(default)) or isinstance(default, float) and isinstance(c, int))
                                 and not (isinstance(c, bool) and not isinstance(default, bool))):
                raise ConfigError(f"{w}.select: candidate {c!r} has type {type(c).__name__}; "
                                  f"expected {type(default).__name__}")
        dup = next((c for i, c in enumerate(cands) if c in cands[:i]), None)
        if dup is not None:
            raise ConfigError(f"{w}.select: candidate {dup!r} is listed twice in {cands!r}")
        m = v.get("metric")
        if not known_evaluate_metric(m):
            raise ConfigError(f"{w}.metric: {m!r} is not a metric to select by; valid: {', '.join(evaluate_metric_names())}")


def _take_select(path, where: str, parsed: list[tuple[str, dict]], entries: list) -> tuple | None:
    """The pipeline's select, if any: (stage index, key, candidates, metric, where it is written),
    with the candidates put in its place so that the grid expands over them."""
    found = [(i, k, v) for i, (kind, params) in enumerate(parsed) for k, v in params.items() if isinstance(v, dict)]
    if not found:
        return None
    origin = [f"{where}[{i}].finetune.{k}" if isinstance(entries[i], dict) and isinstance(entries[i].get("finetune"), dict)
              and k in entries[i]["finetune"] else f"defaults.finetune.{k} (in {where}[{i}])" for i, k, _ in found]
    if len(found) > 1:
        raise ConfigError(f"{path}: {where}: selects {' and '.join(origin)}; one select per pipeline (give the "
                          "other stages a value of their own)")
    (i, k, spec), = found
    clash = [j for j, (_, params) in enumerate(parsed) if j != i and isinstance(params.get(k), list) and k not in LIST_KEYS]
    if clash:
        raise ConfigError(f"{path}: {origin[0]}: {k!r} is also a grid axis of {where}[{clash[0]}]; a setting "
                          "name is either selected or a grid axis in one pipeline")
    parsed[i][1][k] = list(spec["select"])
    return i, k, list(spec["select"]), spec["metric"], origin[0]


def _split_selection(path, family_pls: list, select: tuple, first_seed: int) -> tuple[list, list]:
    """A family expanded over its candidates -> (its selection pipelines, its selections); its
    evaluate stage must record the metric."""
    from ptqlib.selection import missing_metric, split_family

    stage, key, cands, metric, origin = select
    why = missing_metric(metric, family_pls[0].stages[-1].params)
    if why:
        raise ConfigError(f"{path}: {origin}.metric: {metric!r} is not recorded by the pipeline's evaluate stage: {why}")
    return split_family(family_pls, stage, key, cands, metric, first_seed)


def load_study(path: str | Path, check_models: bool = True, allow_network: bool = True) -> Study:
    """Parse, validate and expand a study file. Raises ConfigError before anything runs.

    ``allow_network=False`` (``--dry-run``): a hub model that is not cached locally is not fetched;
    its layer-size checks are left to run time and noted in ``Study.notes``.
    """
    from ptqlib.data import check_task
    from ptqlib.models import check_model_name, linear_input_sizes, model_config

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study file {path} not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping with keys {', '.join(sorted(TOP_KEYS))}")
    _check_keys(path, "top level", raw, TOP_KEYS)
    if "pipelines" not in raw or not isinstance(raw["pipelines"], dict) or not raw["pipelines"]:
        raise ConfigError(f"{path}: pipelines: a non-empty mapping of name -> list of stages is required")
    name = str(raw.get("study", path.stem))
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name) or name in (".", ".."):
        raise ConfigError(f"{path}: study: {name!r} names the folder reports/<study>/: letters, digits, '_', '-', '.' "
                          "only (no path separators)")
    models = raw.get("model", "smollm2-135m")
    models = models if isinstance(models, list) else [models]
    task = raw.get("task", "meetings")
    seeds = raw.get("seeds", [0])
    seeds = seeds if isinstance(seeds, list) else [seeds]
    if not seeds:
        raise ConfigError(f"{path}: seeds: an empty list runs nothing; give at least one seed, e.g. [0, 1, 2]")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise ConfigError(f"{path}: seeds: {s!r} is not an integer >= 0")
    for key, values in (("seeds", seeds), ("model", models)):
        dup = sorted({str(v) for v in values if values.count(v) > 1})
        if dup:
            raise ConfigError(f"{path}: {key}: {', '.join(dup)} given twice; each value once (a repeat would be "
                              "counted as another replicate)")
    if not isinstance(task, str):
        raise ConfigError(f"{path}: task: {task!r} is not a task name; valid: meetings, meetings-hard, "
                          "'jsonl:<path>', 'hf:<dataset>[:<config>]'")
    try:
        check_task(task, allow_network=allow_network)
    except ConfigError as e:
        raise ConfigError(f"{path}: task: {e}") from None
    try:
        for m in models:
            check_model_name(str(m))
    except ConfigError as e:
        raise ConfigError(f"{path}: model: {e}") from None

    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise ConfigError(f"{path}: defaults: expected a mapping of stage kind -> parameters")
    _check_keys(path, "defaults", defaults, STAGE_PARAMS)
    for kind, d in defaults.items():
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: defaults.{kind}: expected a mapping, got {d!r}")
        _check_keys(path, f"defaults.{kind}", d, _fields(STAGE_PARAMS[kind]))
        _check_selects(path, f"defaults.{kind}", kind, d)

    sizes_cache: dict[str, dict] = {}
    pipelines: list[Pipeline] = []
    selections: list = []
    for pname, stages in raw["pipelines"].items():
        where = f"pipelines.{pname}"
        if "~" in str(pname):
            raise ConfigError(f"{path}: {where}: '~' is reserved in pipeline names (selection pipelines are "
                              "<name>~select[...]); rename it")
        if stages is None:
            stages = []
        if not isinstance(stages, list):
            raise ConfigError(f"{path}: {where}: expected a list of stages, got {stages!r}")
        parsed = []
        eval_over: dict = {}
        for i, entry in enumerate(stages):
            kind, params = _normalise_stage(path, f"{where}[{i}]", entry)
            _check_selects(path, f"{where}[{i}].{kind}", kind, params)
            if kind == "evaluate":
                if i != len(stages) - 1:
                    raise ConfigError(f"{path}: {where}[{i}]: evaluate can only be the last entry (every pipeline "
                                      "ends with one); move it to the end")
                eval_over = params
                continue
            parsed.append((kind, {**copy.deepcopy(defaults.get(kind, {})), **params}))
        parsed.append(("evaluate", {**copy.deepcopy(defaults.get("evaluate", {})), **eval_over}))
        select = _take_select(path, where, parsed, stages)  # its candidates become a grid axis, split off below
        start = len(pipelines)
        # grid axes: every list value that is not list-valued by nature, per stage
        axes: dict[str, list] = {}
        for i, (kind, params) in enumerate(parsed):
            for k, v in params.items():
                if isinstance(v, list) and k not in LIST_KEYS:
                    if not v:
                        raise ConfigError(f"{path}: {where}[{i}].{kind}.{k}: an empty list gives an empty grid")
                    if len({repr(x) for x in v}) < len(v):
                        raise ConfigError(f"{path}: {where}[{i}].{kind}.{k}: {v!r} repeats a value; each grid value "
                                          "once (a repeat would duplicate report rows)")
                    axes[f"{i}.{k}"] = v
        trains = any(kind == "finetune" for kind, _ in parsed)
        for model in models:
            for point in _grid(axes) or [{}]:
                # a pipeline is replicated over the seeds when a stage draws from the seed: training,
                # or a calibration left at the pipeline's seed (each seed its own GPTQ draw)
                draws = trains or any(
                    kind == "quantize" and _at(point, i, params, "calib_seed") == -1
                    and getattr(quantize_methods().get(_at(point, i, params, "method")), "calibration", False)
                    for i, (kind, params) in enumerate(parsed))
                for seed in (seeds if draws else seeds[:1]):
                    built, label = [], {}
                    for i, (kind, params) in enumerate(parsed):
                        p = dict(params)
                        for key, val in point.items():
                            si, k = key.split(".", 1)
                            if int(si) == i:
                                p[k] = val
                                label[k] = val
                        swhere = f"{where}[{i}].{kind}" if kind != "evaluate" else "defaults.evaluate"
                        _check_types(STAGE_PARAMS[kind], path, swhere, p)
                        obj = _build(STAGE_PARAMS[kind], path, swhere, p)
                        built.append(Stage(kind, _resolve(path, swhere, kind, dataclasses.asdict(obj), int(seed))))
                    if not any(quantizes(st) for st in built) or built[-1].params["runtime"] != "torch":
                        built[-1].params["kl_reference"] = False  # nothing to compare with (or llama.cpp)
                    _check_pipeline(path, where, built, str(model), sizes_cache, linear_input_sizes,
                                    functools.partial(model_config, allow_network=allow_network), check_models)
                    if len(models) > 1:
                        label["model"] = model
                    if draws and len(seeds) > 1:
                        label["seed"] = seed
                    suffix = "[" + ",".join(f"{k}={v}" for k, v in label.items()) + "]" if label else ""
                    pipelines.append(Pipeline(f"{pname}{suffix}", pname, str(model), task, int(seed), label, built))
        if select:
            pipelines[start:], sels = _split_selection(path, pipelines[start:], select, int(seeds[0]))
            selections += sels
    claims = raw.get("claims") or []
    if not isinstance(claims, list):
        raise ConfigError(f"{path}: claims: expected a list of {{claim, a, b, metric, relation}}")
    for i, c in enumerate(claims):
        if not isinstance(c, dict):
            raise ConfigError(f"{path}: claims[{i}]: expected a mapping, got {c!r}")
        _check_keys(path, f"claims[{i}]", c, CLAIM_KEYS)
        for k in ("claim", "a", "b", "metric"):
            if not isinstance(c.get(k), str):
                raise ConfigError(f"{path}: claims[{i}].{k}: required (a string)")
        for k in ("a", "b"):
            if c[k] not in raw["pipelines"]:
                raise ConfigError(f"{path}: claims[{i}].{k}: {c[k]!r} is not a pipeline; valid: "
                                  + ", ".join(raw["pipelines"]))
        if not claim_metric(c["metric"]):
            raise ConfigError(f"{path}: claims[{i}].metric: {c['metric']!r} is not a metric a study records; valid: "
                              f"{', '.join(evaluate_metric_names())}, <stage>.<metric> of a quantize / finetune stage "
                              "(e.g. finetune.train_loss_last)")
        c.setdefault("relation", ">")
        if c["relation"] not in (">", ">=", "=="):
            raise ConfigError(f"{path}: claims[{i}].relation: {c['relation']!r}; valid: >, >=, ==")
        m = c.setdefault("min_effect", 0.0)
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not m >= 0 or not math.isfinite(m):
            raise ConfigError(f"{path}: claims[{i}].min_effect: {m!r} must be a number >= 0 (the smallest difference "
                              "that counts, in the metric's units)")
        c["min_effect"] = float(m)
    uncached = dict.fromkeys(k[1] if isinstance(k, tuple) else k for k, cfg in sizes_cache.items() if cfg is None)
    notes = [f"model {m!r} is not in the local cache: it will be fetched at run time (its group sizes are checked then)"
             for m in uncached]
    if not allow_network and task.startswith("hf:"):
        notes.append(f"task {task!r}: not checked for a local copy (--dry-run); a real run refuses it at once where "
                     "it is not cached and the hub is off or unreachable")
    executor = raw.get("executor") or {}
    if not isinstance(executor, dict):
        raise ConfigError(f"{path}: executor: expected a mapping of {', '.join(EXECUTOR_KEYS)}, got {executor!r}")
    _check_keys(path, "executor", executor, EXECUTOR_KEYS)
    for k in ("time_min", "gpus", "cpus", "mem_gb"):
        if k in executor and (isinstance(executor[k], bool) or not isinstance(executor[k], (int, float))
                              or executor[k] < 0):
            raise ConfigError(f"{path}: executor.{k}: {executor[k]!r} must be a number >= 0 ({EXECUTOR_KEYS[k]})")
    return Study(name, path, str(raw.get("description", "")), pipelines, claims, notes, dict(executor),
                 selections=selections)


def _check_against_config(path, where, stages: list[Stage], model: str, cache: dict, model_config) -> None:
    """Token windows the model cannot position (GPTQ once ran 5 minutes before failing on one) and
    adapter targets that name no layer of a Llama-style model, from its config (when it is known)."""
    if ("cfg", model) not in cache:
        cache[("cfg", model)] = model_config(model)
    cfg = cache[("cfg", model)]
    if cfg is None:
        return
    cfg = cfg.get("text_config", cfg)
    limit = cfg.get("max_position_embeddings")
    llama_like = cfg.get("model_type") in ("llama", "mistral", "qwen2", "qwen3")
    from ptqlib.models import linear_input_sizes, linear_output_sizes

    ins, outs = (linear_input_sizes(cfg), linear_output_sizes(cfg)) if llama_like else ({}, {})
    layers = tuple(ins)  # the decoder linears of a Llama-style block
    for i, st in enumerate(stages):
        swhere = f"{where}[{i}].{st.kind}" if st.kind != "evaluate" else "defaults.evaluate"
        for key in ("calib_seq_len", "ppl_seq_len", "max_length"):
            if limit and key in st.params and st.params[key] > limit:
                raise ConfigError(f"{path}: {swhere}.{key}: {st.params[key]} is more tokens than model {model!r} "
                                  f"has positions ({limit}); valid: 1 to {limit}")
        unknown = [t for t in st.params.get("target_modules", []) if t not in layers] if st.kind == "finetune" else []
        if llama_like and unknown:
            raise ConfigError(f"{path}: {swhere}.target_modules: {', '.join(map(repr, unknown))} names no layer of "
                              f"model {model!r}; valid: {', '.join(layers)}")
        if llama_like and st.kind == "finetune" and "rank" in finetune_methods()[st.params["method"]].settings:
            # a rank beyond a layer's smaller side adds parameters and no expressiveness (LoftQ's SVD has
            # only that many singular values): a typo (160 for 16) more likely than a wish
            sides = {t: min(ins[t], outs[t]) for t in st.params["target_modules"]}
            most = min(sides.values())
            if st.params["rank"] > most:
                t = min(sides, key=sides.get)
                raise ConfigError(f"{path}: {swhere}.rank: {st.params['rank']} exceeds the smaller side of layer {t} "
                                  f"({ins[t]} in, {outs[t]} out) of model {model!r}; valid: 1 to {most}")


def _check_pipeline(path, where, stages: list[Stage], model: str, sizes_cache, linear_input_sizes, model_config,
                    check_models: bool) -> None:
    """Checks that need the whole chain: what each method needs as input (``FinetuneMethod.needs``,
    tracked through what the stages before it give) and layer sizes."""
    if check_models:
        _check_against_config(path, where, stages, model, sizes_cache, model_config)
    ft = finetune_methods()
    grid = None  # the current model's quantized grid: None (float), "uniform" (QuantLinear) or "bnb"
    base_group: int | None = None  # group size of the current uniform grid
    adapter = None  # an unmerged adapter on the current model (name of its method)
    for i, st in enumerate(stages):
        p = st.params
        swhere = f"{where}[{i}].{st.kind}"
        groups: list[int] = []
        if st.kind == "quantize":
            if adapter:
                mergeable = ", ".join(n for n, e in ft.items() if e.can_merge)
                raise ConfigError(f"{path}: {swhere}: its input carries an unmerged {adapter!r} adapter; "
                                  f"set merge: true on that finetune stage ({mergeable}) to quantize the merged model")
            if grid:
                raise ConfigError(f"{path}: {swhere}: the input is already quantized; add a merge (finetune with merge: true) first")
            grid = quantize_methods()[p["method"]].grid
            base_group = p["group_size"] if grid == "uniform" else None
            groups = [p["group_size"]] if grid == "uniform" else []
        elif st.kind == "finetune":
            name, m = p["method"], ft[p["method"]]
            if m.needs != "float" and not grid:
                raise ConfigError(f"{path}: {swhere}.method: {name!r} trains adapters on a quantized model; put a quantize stage before it")
            if m.needs == "float" and grid:
                raise ConfigError(f"{path}: {swhere}.method: {name!r} needs a float model but its input is quantized; "
                                  f"valid on a quantized input: {', '.join(n for n, e in ft.items() if e.needs != 'float')}")
            if m.needs == "uniform" and grid != "uniform":
                raise ConfigError(f"{path}: {swhere}.method: {name!r} merges into a uniform (rtn / gptq) grid; "
                                  "its input is not one (quantize with method rtn or gptq first)")
            if m.needs == "bnb" and grid != "bnb":
                raise ConfigError(f"{path}: {swhere}.method: {name!r} needs a bitsandbytes 4-bit input; "
                                  "its input is not one (quantize with method nf4 or fp4 first)")
            if m.group == "base":
                # pooling over the base's quantization groups is what makes the merge exact
                if p["group_size"] not in (0, base_group):
                    raise ConfigError(f"{path}: {swhere}.group_size: {p['group_size']} differs from the quantized "
                                      f"base's group_size {base_group}; {name} pools over the base's groups, so leave "
                                      f"group_size out or set it to {base_group}")
                p["group_size"] = base_group  # resolved: the stage id and label carry the real value
            if m.group == "own":
                groups = [p["group_size"]]
            if m.gives == "float" or (m.gives == "adapter" and p["merge"]):
                grid, base_group = None, None
            elif m.gives == "quantized":
                grid, base_group = "uniform", p["group_size"]
                adapter = name if m.keeps_adapter else None
            elif m.gives == "adapter":
                adapter = name
        if check_models and groups:
            if model not in sizes_cache:
                cfg = model_config(model)
                sizes_cache[model] = linear_input_sizes(cfg) if cfg is not None else None
            for g in groups if sizes_cache[model] is not None else []:
                if g == -1:
                    continue
                bad = {k: n for k, n in sizes_cache[model].items() if n % g}
                if bad:
                    raise ConfigError(
                        f"{path}: {swhere}.group_size: {g} does not divide the input size of "
                        + ", ".join(f"{k} ({n})" for k, n in bad.items())
                        + f" in model {model!r}; valid: -1 or a divisor of "
                        + ", ".join(sorted({str(n) for n in sizes_cache[model].values()}))
                    )

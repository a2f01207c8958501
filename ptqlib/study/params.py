"""The parameters of each stage kind: one dataclass per kind, validated in ``__post_init__``.

Quantize and finetune stages have methods: their parameters are the settings every method reads
(``QuantizeSettings``, ``FinetuneSettings``) plus each registered method's own (``ptqlib.methods.Options``
in the method's module), composed by :func:`params_class` into ``QuantizeParams`` / ``FinetuneParams``.
Field comments are the documentation (the notebooks' parameters cells are generated from them);
``kinds.id_params`` says which values enter a stage's id. Errors are ``ConfigError`` naming the key, the bad
value and what is valid. A study file's schema, grids and selections are ``ptqlib.study.schema``.
"""
from __future__ import annotations

import ast
import copy
import dataclasses
import inspect
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

from ptqlib.errors import ConfigError, check_choice, check_positive
from ptqlib.methods import DEFAULT_FINETUNE, DEFAULT_QUANTIZE, finetune_methods, quantize_methods
from ptqlib.precision import PRECISIONS
from ptqlib.text import WINDOW_LAYOUTS


@dataclass
class QuantizeSettings:
    """Post-training quantization of the input model (weights only). The settings every quantize
    method reads; each method's own (GPTQ's damping, bitsandbytes' block size) are its ``options``,
    merged in by :func:`params_class` into ``QuantizeParams``."""

    method: str = DEFAULT_QUANTIZE  # a registered quantization method (python -m ptqlib methods lists them, with their bits and settings)
    bits: int = 4  # weight bits, among those the method allows (python -m ptqlib methods)
    group_size: int = 64  # methods with a grouped uniform grid: input columns per scale/zero (-1: the whole row); must divide every layer's input size
    calib_samples: int = 32  # methods that calibrate: calibration windows of pydoc train text
    calib_seq_len: int = 256  # methods that calibrate: tokens per calibration window
    calib_seed: int = -1  # methods that calibrate: which calibration windows (-1: the pipeline's seed, so each seed is its own draw)
    precision: str = "auto"  # auto | fp32 | bf16: calibration forwards (ptqlib.precision; auto: bf16 where the hardware computes it)
    draws: int = 1  # methods that calibrate, calib_seed -1: calibration draws per seed, each with all its downstream stages (claims average a seed's draws); not a stage setting

    def __post_init__(self) -> None:
        check_choice("method", self.method, quantize_methods())
        if isinstance(self.draws, bool) or not isinstance(self.draws, int) or self.draws < 1:
            raise ConfigError(f"draws: {self.draws!r} must be an integer >= 1 (calibration draws per seed)")
        calibrates = quantize_methods()[self.method].calibrates(self)
        if self.draws > 1 and not (calibrates and self.calib_seed == -1):
            raise ConfigError(f"draws: {self.draws} needs a method that calibrates with calib_seed -1 (each draw its "
                              f"own windows); {self.method!r} " + ("calibrates on no windows" if not calibrates
                                                                    else f"has calib_seed {self.calib_seed}"))
        if self.bits not in quantize_methods()[self.method].bits:
            raise ConfigError(
                f"bits: {self.bits!r} is not supported by method {self.method!r}; valid: "
                + ", ".join(map(str, quantize_methods()[self.method].bits))
            )
        if self.group_size != -1:
            check_positive("group_size", self.group_size)
        check_positive("calib_samples", self.calib_samples)
        check_positive("calib_seq_len", self.calib_seq_len)
        if isinstance(self.calib_seed, bool) or not isinstance(self.calib_seed, int) or self.calib_seed < -1:
            raise ConfigError(f"calib_seed: {self.calib_seed!r} must be -1 (the pipeline's seed) or an integer >= 0")
        check_choice("precision", self.precision, PRECISIONS)


@dataclass
class FinetuneSettings:
    """Training on the task's train split (loss on the answer only), with transformers Trainer. The
    settings every fine-tuning method reads (the adapter ones are ignored by full fine-tuning); each
    method's own (L4Q's bits, Q-BLoRA's pool) are its ``options``, merged in by :func:`params_class`
    into ``FinetuneParams``."""

    method: str = DEFAULT_FINETUNE  # a registered fine-tuning method (python -m ptqlib methods lists them, with the input each needs)
    steps: int = 40  # optimizer steps (0: the method's start alone, e.g. EoRA's training-free correction)
    lr: float = 2e-4  # peak learning rate (cosine schedule)
    warmup_ratio: float = 0.1  # share of steps for linear warm-up
    weight_decay: float = 0.0  # AdamW weight decay
    batch_size: int = 4  # examples per step
    grad_accum: int = 1  # gradient accumulation steps
    max_length: int = 256  # tokens per example (prompt cut from the left)
    train_samples: int = 256  # examples of the task's train split
    rank: int = 8  # adapter rank r (the balanced adapters raise it at equal parameters)
    alpha: float = 16.0  # adapter scale numerator (the scale s is alpha / r)
    dropout: float = 0.0  # LoRA dropout
    target_modules: list = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])  # layers that get adapters
    precision: str = "auto"  # auto | fp32 | bf16: bf16 autocast with fp32 master weights and optimizer state (auto: bf16 where the hardware computes it)
    base_cache: bool = False  # keep a quantized (QuantLinear) base's de-quantized weights across steps: the same numbers, 1.06x faster QLoRA steps on a 2-core CPU, their float size in memory (off: QLoRA's measured memory stays the 4-bit base's)

    def __post_init__(self) -> None:
        check_choice("method", self.method, finetune_methods())
        if not isinstance(self.base_cache, bool):
            raise ConfigError(f"base_cache: {self.base_cache!r} must be true or false")
        for k in ("batch_size", "grad_accum", "max_length", "train_samples", "rank"):
            check_positive(k, getattr(self, k))
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ConfigError(f"steps: {self.steps!r} must be an integer >= 0 (0: the method's start alone, untrained, "
                              "such as a training-free correction)")
        check_positive("lr", self.lr, float)
        check_positive("alpha", self.alpha, float)
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio: {self.warmup_ratio!r} must be in [0, 1)")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout: {self.dropout!r} must be in [0, 1)")
        check_choice("precision", self.precision, PRECISIONS)
        if not isinstance(self.target_modules, list) or not self.target_modules:
            raise ConfigError(f"target_modules: {self.target_modules!r} must be a non-empty list of layer names")


_REGISTRIES = {QuantizeSettings: quantize_methods, FinetuneSettings: finetune_methods}
SETTINGS = {"quantize": QuantizeSettings, "finetune": FinetuneSettings}  # the stage kinds that have methods
_COMPOSED: dict = {}


def field_help(cls) -> dict[str, str]:
    """``{field: help}``: a field's ``metadata["help"]`` where it has one (a composed params class),
    else the comment after the field's line in the source of the class (or a base) that defines it."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass.__module__ == "types":
            continue
        try:
            src = inspect.getsource(klass)
        except (OSError, TypeError):
            continue  # made at run time (make_dataclass): its fields carry metadata
        lines = src.splitlines()
        for node in ast.parse(textwrap.dedent(src)).body[0].body:
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                line = lines[node.end_lineno - 1]
                out[node.target.id] = line.split("  # ", 1)[1].strip() if "  # " in line else ""
    for f in dataclasses.fields(cls):
        if "help" in f.metadata:
            out[f.name] = f.metadata["help"]
    return out


def params_class(settings: type) -> type:
    """A stage kind's parameters: its shared ``settings`` plus the options of every registered method
    (``QuantizeParams`` = ``QuantizeSettings`` + each quantize method's options). Composed, not written
    out, so that a method with a new setting is its own module only. A stage of one method refuses
    another method's setting set away from its default. Kinds without methods (evaluate): ``settings``."""
    registry = _REGISTRIES.get(settings)
    if registry is None:
        return settings
    entries = registry()
    key = (settings, tuple((n, e.options) for n, e in entries.items()))
    if key not in _COMPOSED:
        _COMPOSED[key] = _compose(settings, entries)
    return _COMPOSED[key]


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _type_name(t) -> str:
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))  # "bool" and bool alike


def _compose(settings: type, entries: dict) -> type:
    entries = dict(entries)  # the registry as composed: a method registered later gets a new class
    shared = {f.name for f in dataclasses.fields(settings)}
    found: dict[str, dataclasses.Field] = {}
    owners: dict[str, list[str]] = {}
    helps: dict[str, list[str]] = {}
    for name, e in entries.items():
        if e.options is None:
            continue
        h = field_help(e.options)
        for f in dataclasses.fields(e.options):
            where = f"{e.options.__module__}.{e.options.__name__}.{f.name}"
            if f.name in shared:
                raise TypeError(f"{where}: {f.name!r} is a setting every method reads ({settings.__name__}); "
                                "an option needs a name of its own")
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise TypeError(f"{where}: an option needs a default (what a study that does not set it gets)")
            if f.name in found and ((_type_name(found[f.name].type), _default(found[f.name]))
                                    != (_type_name(f.type), _default(f))):
                raise TypeError(f"{where}: {f.name!r} is declared by another method with type / default "
                                f"{found[f.name].type} = {_default(found[f.name])!r}; one setting has one type and default")
            found.setdefault(f.name, f)
            owners.setdefault(f.name, []).append(name)
            if h.get(f.name) and h[f.name] not in helps.setdefault(f.name, []):
                helps[f.name].append(h[f.name])
    extra = []
    for n, f in found.items():
        kw = {"default": f.default} if f.default is not dataclasses.MISSING else {"default_factory": f.default_factory}
        extra.append((n, f.type, field(**kw, metadata={"help": "; ".join(helps.get(n, [])), "methods": tuple(owners[n])})))

    def __post_init__(self) -> None:
        settings.__post_init__(self)
        if self.method not in entries:
            raise ConfigError(f"method: {self.method!r} was registered after {type(self).__name__} was made; "
                              "use ptqlib.study.kinds.KINDS[kind].params (composed from the registry as it is now)")
        entry = entries[self.method]
        own = {f.name for f in dataclasses.fields(entry.options)} if entry.options else set()
        for f in dataclasses.fields(self):
            if f.name in found and f.name not in own and getattr(self, f.name) != _default(f):
                raise ConfigError(f"{f.name}: {getattr(self, f.name)!r} has no effect on method {self.method!r}; it "
                                  f"applies to {', '.join(f.metadata['methods'])} only (leave it out)")
        if entry.options:  # the method's own validation; it may normalise a value (a default group)
            opts = entry.options(**{n: getattr(self, n) for n in own})
            for n in own:
                setattr(self, n, getattr(opts, n))

    name = settings.__name__.replace("Settings", "Params")
    return dataclasses.make_dataclass(name, extra, bases=(settings,), namespace={
        "__post_init__": __post_init__, "__doc__": settings.__doc__, "__module__": __name__})


def option_owners(kind_settings: type) -> dict[str, tuple[str, ...]]:
    """``{option setting: the methods that read it}`` for a kind's composed params."""
    return {f.name: f.metadata["methods"] for f in dataclasses.fields(params_class(kind_settings))
            if "methods" in f.metadata}


def __getattr__(name: str):
    # QuantizeParams / FinetuneParams are composed from the registry when first asked for (PEP 562)
    if name == "QuantizeParams":
        return params_class(QuantizeSettings)
    if name == "FinetuneParams":
        return params_class(FinetuneSettings)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


RUNTIMES = ("torch", "llama.cpp")
GENERATIONS = ("prefix", "generate")  # evaluate.generation: ptqlib.stages.generation.greedy | transformers' generate


@dataclass
class EvaluateParams:
    """Held-out perplexity, task accuracy from greedy generation, size and speed."""

    ppl_samples: int = 32  # held-out windows per perplexity source (2 sources: 64 x ppl_seq_len tokens in all)
    ppl_seq_len: int = 256  # tokens per window
    ppl_windows: str = "random"  # random: non-overlapping windows at seeded random positions over all held-out topics / modules (clustered by document in the claims); first: the first consecutive windows (before)
    kl_reference: bool = True  # KL divergence and top-1 agreement of next-token distributions vs the pipeline's 16-bit reference (the input of its first quantizing stage) on the perplexity windows; off where nothing quantizes; in llama.cpp only where set here (true), against the reference's float32 forward
    ppl_sources: list = field(default_factory=lambda: ["pydoc", "stdlib"])  # held-out text: pydoc (language reference -> ppl), stdlib (library source code -> ppl_stdlib); [] for no perplexity
    task_samples: int = 128  # held-out task examples generated greedily
    split: str = "test"  # test | validation: which held-out task examples are generated (validation: for select)
    max_new_tokens: int = 64  # generation length limit
    batch_size: int = 32  # generation / perplexity batch size
    generation: str = "prefix"  # prefix: ptqlib's greedy loop, the prompts' shared prefix computed once (stages.generation) | generate: transformers' generate, left-padded (the path before 2026-12-05; same fp32 tokens, 85% of bf16 outputs)
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
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("ppl_windows", self.ppl_windows, WINDOW_LAYOUTS)
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
        check_positive("speed_tokens", self.speed_tokens)
        if not isinstance(self.lm_eval_tasks, list) or not all(isinstance(t, str) for t in self.lm_eval_tasks):
            raise ConfigError(f"lm_eval_tasks: {self.lm_eval_tasks!r} must be a list of task names")
        if self.lm_eval_include and not Path(self.lm_eval_include).expanduser().is_dir():
            raise ConfigError(f"lm_eval_include: {self.lm_eval_include!r} is not a directory")
        for k in ("ppl_samples", "ppl_seq_len", "max_new_tokens", "batch_size"):
            check_positive(k, getattr(self, k))
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
        check_choice("split", self.split, ("test", "validation"))
        check_choice("generation", self.generation, GENERATIONS)


def from_namespace(cls, ns: dict):
    """A stage notebook's parameters as the validated ``cls``: every field read from ``ns`` (the
    notebook's globals, where papermill injected them; a method's option missing there: its default). One call instead of each notebook listing the
    fields again: a listed copy once dropped ``sym_grid`` / ``group_grid``, so a study's value was
    silently replaced by the default."""
    fields = dataclasses.fields(cls)
    missing = [f.name for f in fields if f.name not in ns and "methods" not in f.metadata]
    if missing:
        raise ConfigError(f"{cls.__name__}: the notebook defines no {', '.join(missing)} (add them to its parameters cell)")
    # a method's option may be missing from a cell written before its module was added: its default
    return cls(**{f.name: copy.deepcopy(ns[f.name]) for f in fields if f.name in ns})


def foreign_settings(kind: str, method) -> set[str]:
    """The option settings of ``kind`` that ``method`` does not read (every option for an unknown method
    name, whose stage is refused anyway; none for a non-string method, a grid axis, or a kind without
    methods): ``defaults`` give them only to the methods that read them."""
    if kind not in SETTINGS or not isinstance(method, str):
        return set()
    return {k for k, owners in option_owners(SETTINGS[kind]).items() if method not in owners}


LIST_KEYS = {"target_modules", "lm_eval_tasks", "ppl_sources"}  # list-valued by nature: never a grid axis


def fields_of(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}

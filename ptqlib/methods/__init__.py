"""The method registry: one entry per quantization and per fine-tuning method.

Each method is one module of this package that calls :func:`register` at import; every module
here is imported when the registry is first read, so adding a method is adding its module (plus
its tests and a study file). Methods outside ptqlib register the same way from a module named in
the environment variable ``PTQLIB_METHODS`` (comma-separated import paths), imported after the
built-in ones in every process that reads the registry, the stage kernels included.

Who reads an entry:

- ``ptqlib.study`` validation: the method names, the bits a method allows, its own settings (``options``),
  which input a fine-tuning method needs and what the next stage gets from it (``study.checks``);
- the quantize / finetune stages (``stages.quantize``, ``stages.finetune``): the entry's functions;
- ``artifacts.load``: the artifact types the modules register (:class:`ArtifactType`);
- the runner's stage labels and the report's settings columns (``label_keys``, ``settings``).

This module imports no torch (the study file is validated without it); method modules import it
inside their functions.
"""
from __future__ import annotations

import importlib
import os
import pkgutil
import sys
from dataclasses import dataclass
from typing import Any, Callable, Literal, Protocol


class StageSettings(Protocol):
    """What a method's hooks receive as ``p``: a stage's validated settings, read by attribute (``p.bits``,
    ``p.group_size``, a method's own ``Options`` fields). ``ptqlib.study.params`` builds them (the shared
    settings plus every method's options); declared here so that a method needs nothing from the study
    layer above this one."""

    def __getattr__(self, name: str) -> Any: ...


# What a fine-tuning method needs as input:
#   float      a float model (no quantized layer)
#   quantized  any quantized model (bitsandbytes 4-bit or a uniform QuantLinear grid)
#   uniform    a uniform (integer codes, scale and zero per group) grid: rtn / gptq / l4q output
#   bnb        a bitsandbytes 4-bit model (nf4 / fp4 output)
Needs = Literal["float", "quantized", "uniform", "bnb"]
# What the next stage gets from it:
#   float      a float model (full fine-tuning)
#   adapter    the input plus an unmerged adapter (merge: true makes it a float model, if can_merge)
#   quantized  a new grid (its `grid`: uniform, of the method's own bits / group; or bnb), plus an adapter if keeps_adapter
#   merged     the input's uniform grid, the adapter merged into it (still quantized, same group)
Gives = Literal["float", "adapter", "quantized", "merged"]
Grid = Literal["uniform", "bnb", "gguf"]


@dataclass(frozen=True)
class QuantizeMethod:
    name: str
    summary: str  # one line for --help and the docs
    bits: tuple[int, ...]  # the weight bits it supports
    grid: Grid  # uniform: QuantLinear (codes, scale, zero per group); bnb: bitsandbytes Linear4bit; gguf: a
    #             llama.cpp file, loaded as its de-quantized float weights
    quantize: Callable  # (input_ref, p: StageSettings, calib | None, progress) -> (model, tokenizer, stats)
    save: Callable  # (model, tokenizer, p, output_dir) -> artifact info (artifact.json)
    settings: tuple[str, ...] = ()  # the params a reader needs next to its numbers (report, results.csv)
    label_keys: tuple[str, ...] = ()  # params shown in the stage label: bits -> "4b", group_size -> "g64"
    calibration: bool | Callable = False  # needs calibration windows (calib_samples x calib_seq_len tokens); a
    #                                       callable (params dict) -> bool where a setting decides (kquant's imatrix)
    options: type | None = None  # its own settings: a dataclass (``Options`` below) merged into QuantizeParams
    fixed_precision: str = ""  # computes in this precision whatever ``precision`` says (not in its stage ids)
    inert: Callable | None = None  # (params dict) -> its settings that cannot act there (left out of its stage id)
    dense_weight: Callable | None = None  # (module) -> its layer's de-quantized weight, or None if not its layer
    prepare_inference: Callable | None = None  # (model, dtype) -> None: its layers ready to score at dtype (CPU)
    check: Callable | None = None  # (params dict) -> why its settings do not go together, or None (study load)
    variants: str = ""  # the named formats its settings select, for `python -m ptqlib methods` ("" none)

    def calibrates(self, p) -> bool:
        """Whether it reads calibration windows at params ``p`` (a dict, or a params object)."""
        return bool(self.calibration(p if isinstance(p, dict) else vars(p))) if callable(self.calibration) \
            else self.calibration


@dataclass(frozen=True)
class FinetuneMethod:
    name: str
    summary: str
    needs: Needs
    gives: Gives
    prepare: Callable  # (model, p: StageSettings, input_ref) -> the trainable model
    save: Callable  # (model, tokenizer, p, output_dir, input_ref) -> artifact info
    settings: tuple[str, ...] = ()
    label_keys: tuple[str, ...] = ()
    bits: tuple[int, ...] = ()  # its own weight bits (gives quantized); empty: bits is not read
    group: Literal["", "own", "base"] = ""  # group_size: "" not read; own: its grid's (0 -> 64); base: the input's
    can_merge: bool = False  # merge: true folds the adapter into a float copy of the weights
    keeps_adapter: bool = False  # gives quantized with a separate adapter (cannot be quantized again)
    why_needs: str = ""  # said when its input is not what it needs (why; what to use instead)
    options: type | None = None  # its own settings: a dataclass (``Options`` below) merged into FinetuneParams
    draws_init: bool = True  # its prepare draws random initial weights (an adapter); False: full fine-tuning
    grid: Grid = "uniform"  # gives quantized: the grid its output is (uniform: QuantLinear; bnb: bitsandbytes 4-bit)


def dense_weight(module):
    """``module``'s de-quantized weight from the first quantize method whose ``dense_weight`` hook knows its
    layer type (a dispatch over the registry, as peft tries its backends in order); None for a float layer."""
    seen = set()
    for entry in quantize_methods().values():
        if entry.dense_weight is not None and entry.dense_weight not in seen:
            seen.add(entry.dense_weight)
            w = entry.dense_weight(module)
            if w is not None:
                return w
    return None


def prepare_inference(model, dtype) -> None:
    """Every quantize method's ``prepare_inference`` hook on ``model`` (each acts on its own layers only)."""
    for hook in dict.fromkeys(e.prepare_inference for e in quantize_methods().values() if e.prepare_inference):
        hook(model, dtype)


class Options:
    """Base of a method's own settings: a ``@dataclass`` subclass in the method's module, one field per
    setting with its default and a ``# help`` comment on the field's line (the notebooks' parameters cells
    and the docs read it), validated in ``__post_init__`` (raise ``ptqlib.errors.ConfigError`` naming the
    key, the value and what is valid; a normalised value, e.g. a default group, may be assigned there).

    ``ptqlib.study.params`` merges every registered method's options into its stage kind's parameters
    (``QuantizeParams`` / ``FinetuneParams``): a study file writes them beside the shared settings, a stage
    of another method refuses them, and only the stages of the methods that declare a setting carry it in
    their id. Methods that read the same setting share one class (or subclass it); a name declared by
    two classes must have the same type and default."""


@dataclass(frozen=True)
class ArtifactType:
    """A kind of stage output (``artifact.json`` ``type``) and how to load it."""

    name: str
    load: Callable  # (ref, info, device) -> (model, tokenizer)
    quantized: bool | Literal["base"]  # "base": as quantized as the artifact it sits on (info["base"])
    gguf: Callable | None = None  # (ref, info) -> its own GGUF file, which runtime llama.cpp scores as it is


# The methods a stage gets when its settings name none (``study.params``' defaults): RTN, which needs no
# calibration and no other library; LoRA, the adapter of a float model. A stage notebook opened on its own
# continues the previous notebook's output (02 fine-tunes what 01 quantized): there the fine-tuning default
# is QLoRA, the adapter of a quantized model (``study.kinds``' ``explore``). Named here so that no module
# outside this package names a method.
DEFAULT_QUANTIZE = "rtn"
DEFAULT_FINETUNE = "lora"
DEFAULT_FINETUNE_ON_QUANTIZED = "qlora"

QUANTIZE: dict[str, QuantizeMethod] = {}
FINETUNE: dict[str, FinetuneMethod] = {}
ARTIFACTS: dict[str, ArtifactType] = {}
_TABLES = {QuantizeMethod: QUANTIZE, FinetuneMethod: FINETUNE, ArtifactType: ARTIFACTS}
_loaded = False
# the built-in modules imported first, so that lists in messages read in the studies' order; any
# other module of the package is imported after them (a new method needs no entry here)
_FIRST = ("uniform", "bnb", "full", "lora", "l4q", "qat_lora", "blora")


_REGISTERED_BY: dict[tuple[type, str], str] = {}  # (entry type, name) -> the module that registered it


def register(*entries: QuantizeMethod | FinetuneMethod | ArtifactType) -> None:
    """Add entries to the registry; a name can be registered once per table."""
    caller = sys._getframe(1).f_globals.get("__name__", "?")
    for e in entries:
        table = _TABLES[type(e)]
        if e.name in table and table[e.name] != e:
            raise ValueError(f"{type(e).__name__} {e.name!r} is registered twice: by {_origin(table[e.name])} "
                             f"and by {_origin(e)}")
        table[e.name] = e
        _REGISTERED_BY.setdefault((type(e), e.name), caller)


def _origin(e) -> str:
    fn = getattr(e, "prepare", None) or getattr(e, "quantize", None) or e.load
    return getattr(fn, "__module__", "?")


def load_all() -> None:
    """Import every method module of this package, then those named in ``PTQLIB_METHODS``."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    found = sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))
    modules = [f"{__name__}.{m}" for m in [m for m in _FIRST if m in found] + [m for m in found if m not in _FIRST]]
    for mod in modules:
        importlib.import_module(mod)
    extra = list(filter(None, (s.strip() for s in os.environ.get("PTQLIB_METHODS", "").split(","))))
    for name in extra:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ImportError(f"PTQLIB_METHODS names {name!r}, which does not import: {e}") from e
    # the tables in module order, whichever module a process happened to import first (a test or a stage
    # that imports methods.bnb before the registry is read registered nf4 ahead of rtn)
    rank = {m: i for i, m in enumerate(modules + extra)}
    for kind, table in _TABLES.items():
        entries = sorted(table.items(), key=lambda kv: rank.get(_REGISTERED_BY.get((kind, kv[0]), ""), len(rank)))
        table.clear()
        table.update(entries)


def quantize_methods() -> dict[str, QuantizeMethod]:
    load_all()
    return QUANTIZE


def finetune_methods() -> dict[str, FinetuneMethod]:
    load_all()
    return FINETUNE


def artifact_types() -> dict[str, ArtifactType]:
    load_all()
    return ARTIFACTS


def _get(table: dict, kind: str, name: str):
    load_all()
    if name not in table:
        raise ValueError(f"unknown {kind} method {name!r}; valid: {', '.join(table)}")
    return table[name]


def quantize_method(name: str) -> QuantizeMethod:
    return _get(QUANTIZE, "quantize", name)


def finetune_method(name: str) -> FinetuneMethod:
    return _get(FINETUNE, "fine-tuning", name)

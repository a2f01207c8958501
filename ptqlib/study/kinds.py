"""The registry of stage kinds: what each kind is called in a study file, its parameters, the notebook
that runs it, what enters its id besides its parameters and input, and its special cases (its label,
whether it makes a quantized model, values resolved per pipeline, whether it is the implicit last stage
and takes the 16-bit reference). Adding a kind (an export, a merge) is one ``StageKind`` here, its
parameters dataclass and its notebook; the schema, the graph and the engine ask the entry, never the name."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ptqlib.methods import DEFAULT_FINETUNE_ON_QUANTIZED, FinetuneMethod, QuantizeMethod, finetune_method, quantize_methods
from ptqlib.seeding import derive_seed
from ptqlib.study.checks import finetune_step, quantize_step
from ptqlib.study.neutral import HISTORIC, ID_FREE, ID_NEUTRAL
from ptqlib.study.params import EvaluateParams, FinetuneSettings, QuantizeSettings, foreign_settings, params_class


@dataclass(frozen=True)
class StageKind:
    name: str  # the key in a study file: {quantize: ...}
    settings: type  # its parameters dataclass (validated in __post_init__); with methods, their shared settings
    notebook: str  # notebooks/<file>: the stage's body, run by papermill
    reads_task: bool  # the task's examples enter what it computes (the task is in its id)
    draws: bool  # it draws from the pipeline's seed (the seed is in its id; the pipeline repeats per seed)
    selectable: bool = False  # its settings can be chosen on validation ({select: [...], metric: ...})
    label: Callable[[dict, int], str] = lambda p, seed: "?"  # (params, seed) -> "finetune(lora, r8, 40 steps, seed 0)"
    makes_grid: Callable[[dict], bool] = lambda p: False  # it makes a quantized model from a float one
    seeded: Callable[[dict], bool] = lambda p: False  # draws from the seed at these params, though the kind need not
    resolve: Callable[[dict, int, int, dict], dict] | None = None  # (built, seed, draw, given) -> values for its id
    implicit: bool = False  # the last stage of every pipeline, written only to override defaults.<kind>
    takes_reference: bool = False  # it receives the pipeline's 16-bit reference (the input of its first grid maker)
    inert: Callable[[dict], set[str]] = lambda p: set()  # params that cannot act at these values: not in its id
    chain_step: Callable | None = None  # (path, where, params, input) -> group sizes: what it needs of its input
    #                                    and gives the next stage (study.checks.check_pipeline)
    explore: dict = field(default_factory=dict)  # its notebook's defaults where they differ from the settings':
    #   opened on its own the notebook continues the previous notebook's output (study.cells)

    @property
    def params(self) -> type:
        """Its parameters: ``settings`` plus the registered methods' options (``params.params_class``)."""
        return params_class(self.settings)


def label_extra(entry: QuantizeMethod | FinetuneMethod, p: dict) -> str:
    """``", 4b, g64"`` for the entry's label keys (stage labels; ``p``: a stage's params dict). A value left
    out of stage ids (``ID_NEUTRAL``) is left out of labels too."""
    neutral = ID_NEUTRAL.get("quantize" if isinstance(entry, QuantizeMethod) else "finetune", {})
    fmt = {"bits": "{}b", "group_size": "g{}", "pool_norm": "{} pool"}
    return "".join(", " + fmt.get(k, k + " {}").format(p[k]) for k in entry.label_keys
                   if k in p and not (k in neutral and neutral[k] == p[k]))


def _quantize_resolve(p: dict, seed: int, draw: int, given: dict) -> dict:
    """A method with a fixed precision computes in it; ``calib_seed: -1`` -> the pipeline's seed where the method
    calibrates (draw k > 0: a seed derived from it), 0 (unread) where it does not (the id such stages always had);
    ``draws`` says how the pipeline is replicated, not what the stage computes (not in its params)."""
    entry = quantize_methods()[p["method"]]
    if entry.fixed_precision:
        p["precision"] = entry.fixed_precision  # what it computes in (not in its id)
    if p["calib_seed"] == -1:
        p["calib_seed"] = seed if entry.calibrates(p) else 0
    p.pop("draws")
    if draw and given.get("calib_seed", -1) == -1 and p["calib_seed"] == seed:
        p["calib_seed"] = derive_seed(seed, "calibration", str(draw))
    return p


def _quantize_seeded(p: dict) -> bool:
    """Calibration windows left at the pipeline's seed, for a method that calibrates: each seed its own draw."""
    entry = quantize_methods().get(p.get("method"))
    return p.get("calib_seed", -1) == -1 and bool(entry and entry.calibrates(p))


def _quantize_inert(p: dict) -> set[str]:
    """The method's settings that cannot act at these params (``QuantizeMethod.inert``), and ``precision``
    where no calibration forward runs at it (a method that does not calibrate, or has a fixed precision)."""
    entry = quantize_methods().get(p.get("method"))
    if entry is None:
        return set()
    out = set(entry.inert(p)) if entry.inert else set()
    if not entry.calibrates(p) or entry.fixed_precision:
        out.add("precision")
    return out


def _evaluate_inert(p: dict) -> set[str]:
    """llama.cpp computes in its own types: the stage's ``precision`` does not act there."""
    return {"precision"} if p.get("runtime") == "llama.cpp" else set()


def _finetune_label(p: dict, seed: int) -> str:
    extra = label_extra(finetune_method(p["method"]), p)
    return f"finetune({p['method']}{extra}, {p['steps']} steps, seed {seed}{', merge' if p['merge'] else ''})"


KINDS: dict[str, StageKind] = {k.name: k for k in (
    StageKind("quantize", QuantizeSettings, "01_quantize.ipynb", reads_task=False, draws=False,
              label=lambda p, seed: f"quantize({p['method']}{label_extra(quantize_methods()[p['method']], p)})",
              makes_grid=lambda p: True, seeded=_quantize_seeded, resolve=_quantize_resolve, inert=_quantize_inert,
              chain_step=quantize_step),
    StageKind("finetune", FinetuneSettings, "02_finetune.ipynb", reads_task=True, draws=True, selectable=True,
              label=_finetune_label, explore={"method": DEFAULT_FINETUNE_ON_QUANTIZED},  # 02 reads 01's output
              makes_grid=lambda p: finetune_method(p["method"]).gives in ("quantized", "merged"),
              chain_step=finetune_step),
    StageKind("evaluate", EvaluateParams, "03_evaluate.ipynb", reads_task=True, draws=False,
              label=lambda p, seed: "evaluate(validation)" if p.get("split") == "validation" else "evaluate",
              implicit=True, takes_reference=True, inert=_evaluate_inert),
)}
IMPLICIT = next(k for k, sk in KINDS.items() if sk.implicit)  # the stage every pipeline ends with (evaluate)


def id_params(kind: str, params: dict) -> dict:
    """The params that enter a stage's id: all, less ``ID_NEUTRAL`` values, other methods' options
    (except the ``HISTORIC`` ones every id carried before methods declared their own), and the settings
    that cannot act at these params (the kind's ``StageKind.inert``: a method's own, such as RTN's and
    GPTQ's ``sym_grid`` of an asymmetric run, or a precision nothing computes in), so adding those rules
    re-ran only the stages whose codes they change."""
    neutral, free = ID_NEUTRAL.get(kind, {}), ID_FREE.get(kind, ())
    out = {k: v for k, v in params.items() if not (k in neutral and neutral[k] == v) and k not in free}
    for k in foreign_settings(kind, params.get("method")) - set(HISTORIC.get(kind, ())):
        out.pop(k, None)  # another method's setting, at its default here: not what this stage computes from
    entry = KINDS.get(kind)
    for k in entry.inert(params) if entry is not None else ():
        out.pop(k, None)  # a setting that cannot act at these params
    return out


def quantizes(kind: str, params: dict) -> bool:
    """Does a stage make a quantized model from a float one (PTQ, or a method that trains into a grid)?"""
    return KINDS[kind].makes_grid(params)


def as_params(kind: str, p):
    """The typed, validated params of a stage kind from a dataclass (returned as it is) or a dict
    (a stage record's ``params``, or a few keys with the rest defaulted): what the stage code takes."""
    cls = KINDS[kind].params
    if isinstance(p, KINDS[kind].settings):  # this class, or one composed before a later registration
        return p
    if isinstance(p, dict):
        return cls(**p)
    raise TypeError(f"{kind} params must be a {cls.__name__} or a dict, got {type(p).__name__}")

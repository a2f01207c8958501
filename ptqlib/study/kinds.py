"""The registry of stage kinds: what each kind is called in a study file, its parameters, the notebook
that runs it, and what enters its id besides its parameters and input. Adding a kind (an export, a
merge) is one ``StageKind`` here, its parameters dataclass and its notebook."""
from __future__ import annotations

from dataclasses import dataclass

from ptqlib.study.params import EvaluateParams, FinetuneSettings, QuantizeSettings, params_class


@dataclass(frozen=True)
class StageKind:
    name: str  # the key in a study file: {quantize: ...}
    settings: type  # its parameters dataclass (validated in __post_init__); with methods, their shared settings
    notebook: str  # notebooks/<file>: the stage's body, run by papermill
    reads_task: bool  # the task's examples enter what it computes (the task is in its id)
    draws: bool  # it draws from the pipeline's seed (the seed is in its id; the pipeline repeats per seed)
    selectable: bool = False  # its settings can be chosen on validation ({select: [...], metric: ...})

    @property
    def params(self) -> type:
        """Its parameters: ``settings`` plus the registered methods' options (``params.params_class``)."""
        return params_class(self.settings)


KINDS: dict[str, StageKind] = {k.name: k for k in (
    StageKind("quantize", QuantizeSettings, "01_quantize.ipynb", reads_task=False, draws=False),
    StageKind("finetune", FinetuneSettings, "02_finetune.ipynb", reads_task=True, draws=True, selectable=True),
    StageKind("evaluate", EvaluateParams, "03_evaluate.ipynb", reads_task=True, draws=False),
)}


def as_params(kind: str, p):
    """The typed, validated params of a stage kind from a dataclass (returned as it is) or a dict
    (a stage record's ``params``, or a few keys with the rest defaulted): what the stage code takes."""
    cls = KINDS[kind].params
    if isinstance(p, KINDS[kind].settings):  # this class, or one composed before a later registration
        return p
    if isinstance(p, dict):
        return cls(**p)
    raise TypeError(f"{kind} params must be a {cls.__name__} or a dict, got {type(p).__name__}")

"""What a loaded study is: its pipelines (each a chain of stages at one grid point and seed), its
claims and its selections. Plain data; ``schema.load_study`` builds it from a study file."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


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
    selections: list = field(default_factory=list)  # ptqlib.study.selection.Selection: each select, per grid point
    final: bool = False  # `final: true`: its run is the one the README's findings stand on (declared before it runs)

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
      ft_ptq_adapter:
        - finetune: {method: full, lr: 2.0e-5}
        - quantize: {method: <quantize method>}   # python -m ptqlib methods lists them (parameters/ has
        - finetune: {method: <adapter method>}    # the studies that run them)

Every pipeline ends with an implicit ``evaluate`` stage; a last entry ``{evaluate: {...}}``
overrides ``defaults.evaluate`` for that pipeline (e.g. ``runtime: llama.cpp``). A list value in a stage (``bits: [3, 4]``)
expands the pipeline into a grid, except for keys whose value is a list by nature
(``target_modules``). The parameters of each stage kind are the dataclasses of ``ptqlib.study.params``: their
field comments are the documentation, and ``__post_init__`` validates each value.
A finetune setting given as ``{select: [candidates], metric: field_f1}`` (in a stage or in
``defaults.finetune``; one per pipeline) is chosen on the task's validation split: each candidate
trains at the first seed and is scored on validation (pipelines ``<name>~select[lr=...]``), and
the best one is the value of the pipeline's test-set runs (all seeds). See ``ptqlib.study.selection``.
Errors are ``ConfigError`` naming file, key, bad value and what is valid, raised before any stage runs.
:func:`load_study` reads and checks the file's header here; ``ptqlib.study.expand`` expands each pipeline.
"""
from __future__ import annotations

import re
from pathlib import Path

import yaml

from ptqlib.errors import ConfigError
from ptqlib.study.choices import check_selects
from ptqlib.study.claims_spec import checked_claims
from ptqlib.study.expand import Header, expand_pipeline
from ptqlib.study.kinds import KINDS
from ptqlib.study.loader import StudyLoader
from ptqlib.study.loader import check_keys as _check_keys
from ptqlib.study.params import fields_of
from ptqlib.study.pipeline import Pipeline, Study

TOP_KEYS = {"study", "description", "model", "task", "seeds", "defaults", "pipelines", "claims", "executor", "final",
            "selection_seed"}
# the `executor:` section (run --executor slurm): where and with what resources each stage job runs
EXECUTOR_KEYS = {"partition": "SLURM partition", "account": "SLURM account", "qos": "SLURM QOS",
                 "time_min": "minutes per stage job", "gpus": "GPUs per stage job", "cpus": "CPU cores per stage job",
                 "mem_gb": "memory per stage job (GB)", "constraint": "SLURM node constraint"}


MAX_NAME = 100  # characters of a study name (a folder reports/<study>/; a path component has at most 255 bytes)


def load_study(path: str | Path, check_models: bool = True, allow_network: bool = True) -> Study:
    """Parse, validate and expand a study file. Raises ConfigError before anything runs.

    ``allow_network=False`` (``--dry-run``): a hub model that is not cached locally is not fetched;
    its layer-size checks are left to run time and noted in ``Study.notes``.
    """
    path = Path(path)
    raw = _read(path)
    name, header = _name(path, raw), _header(path, raw, allow_network)
    defaults = _defaults(path, raw)
    sizes_cache: dict[str, dict] = {}
    pipelines: list[Pipeline] = []
    selections: list = []
    for pname, stages in raw["pipelines"].items():  # str(): `1:` is an int key in YAML; claims name strings
        pls, sels = expand_pipeline(path, str(pname), stages, header, defaults, sizes_cache, check_models,
                                    allow_network)
        pipelines += pls
        selections += sels
    for task in header.tasks if selections else []:  # before any candidate trains, not at its validation evaluate
        if task.startswith("jsonl:"):
            from ptqlib.data import load_task

            try:
                load_task(task, "validation", 1)
            except ConfigError as e:
                raise ConfigError(f"{path}: task: {e}; the study selects a setting on the validation split") from None
    _check_names(path, pipelines)
    claims = checked_claims(path, raw)
    _check_field_metrics(path, header.tasks, claims, selections)
    return Study(name, path, str(raw.get("description", "")), pipelines, claims,
                 _notes(sizes_cache, header.tasks, allow_network), _executor(path, raw), selections=selections,
                 final=_final(path, raw))


def _check_field_metrics(path: Path, tasks: list[str], claims: list[dict], selections: list) -> None:
    """Refuse a claim or a selection by a metric that scores "field: value" references (field F1) in a study over
    a task whose references have none: every output would score 0 and the verdict would be about nothing."""
    from ptqlib.data import has_fields
    from ptqlib.metrics import metric

    fieldless = [t for t in tasks if has_fields(t) is False]
    uses = [(f"claims[{i}].metric", c["metric"]) for i, c in enumerate(claims)]
    uses += [(f"the select of {s.where()}", s.metric) for s in selections]
    for where, name in uses:
        m = metric(name)
        if fieldless and m is not None and m.fields:
            raise ConfigError(f"{path}: {where}: {name!r} scores 'field: value' references, which task "
                              f"{fieldless[0]!r} does not have (every output would score 0); valid there: rouge_l, "
                              "or task_score (each task's own score) in a study over several tasks")


def _read(path: Path) -> dict:
    """The study file's YAML (aliases and duplicate keys refused: ``loader.StudyLoader``), its top level checked."""
    if not path.is_file():
        raise ConfigError(f"study file {path} not found")
    try:
        raw = yaml.load(path.read_text(), Loader=StudyLoader)  # noqa: S506 — a SafeLoader (loader.py)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping with keys {', '.join(sorted(TOP_KEYS))}")
    _check_keys(path, "top level", raw, TOP_KEYS)
    if "pipelines" not in raw or not isinstance(raw["pipelines"], dict) or not raw["pipelines"]:
        raise ConfigError(f"{path}: pipelines: a non-empty mapping of name -> list of stages is required")
    return raw


def _name(path: Path, raw: dict) -> str:
    """The study's name: the folder reports/<study>/ (the file's stem unless ``study:`` gives one)."""
    name = str(raw.get("study", path.stem))
    if len(name) > MAX_NAME:
        raise ConfigError(f"{path}: study: a name of {len(name)} characters ({name[:40]}...); at most {MAX_NAME} "
                          "(it names the folder reports/<study>/)")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name) or name in (".", ".."):
        raise ConfigError(f"{path}: study: {name!r} names the folder reports/<study>/: letters, digits, '_', '-', '.' "
                          "only (no path separators)")
    return name


def _header(path: Path, raw: dict, allow_network: bool) -> Header:
    """``model`` and ``task`` (each a name or a list), ``seeds`` and ``selection_seed``, validated."""
    from ptqlib.data import TASKS, check_task
    from ptqlib.models import check_model_name

    models = raw.get("model", "smollm2-135m")
    models = models if isinstance(models, list) else [models]
    tasks = raw.get("task", "meetings")
    tasks = tasks if isinstance(tasks, list) else [tasks]
    seeds = raw.get("seeds", [0])
    seeds = seeds if isinstance(seeds, list) else [seeds]
    if not seeds:
        raise ConfigError(f"{path}: seeds: an empty list runs nothing; give at least one seed, e.g. [0, 1, 2]")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise ConfigError(f"{path}: seeds: {s!r} is not an integer >= 0")
    sel_seed = raw.get("selection_seed")  # the selections' training seed; None: the first of seeds
    if sel_seed is not None and (isinstance(sel_seed, bool) or not isinstance(sel_seed, int) or sel_seed < 0):
        raise ConfigError(f"{path}: selection_seed: {sel_seed!r} is not an integer >= 0 (a seed no test pipeline uses, "
                          "e.g. 100)")
    for key, values in (("seeds", seeds), ("model", models), ("task", tasks)):
        dup = sorted({str(v) for v in values if values.count(v) > 1})
        if dup:
            raise ConfigError(f"{path}: {key}: {', '.join(dup)} given twice; each value once (a repeat would be "
                              "counted as another replicate)")
    if not tasks:
        raise ConfigError(f"{path}: task: an empty list runs nothing; give a task name or a list of them")
    for task in tasks:
        if not isinstance(task, str):
            raise ConfigError(f"{path}: task: {task!r} is not a task name; valid: {', '.join(TASKS)}, "
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
    return Header(models, tasks, seeds, sel_seed)


def _defaults(path: Path, raw: dict) -> dict:
    """``defaults:`` per stage kind, each key a setting of that kind (a select validated)."""
    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise ConfigError(f"{path}: defaults: expected a mapping of stage kind -> parameters")
    _check_keys(path, "defaults", defaults, KINDS)
    for kind, d in defaults.items():
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: defaults.{kind}: expected a mapping, got {d!r}")
        _check_keys(path, f"defaults.{kind}", d, fields_of(KINDS[kind].params))
        check_selects(path, f"defaults.{kind}", kind, d)
    return defaults


def _check_names(path: Path, pipelines: list[Pipeline]) -> None:
    """A pipeline named like another's grid point ("ft[seed=0]" beside ft's seeds) is refused."""
    owner: dict[str, str] = {}
    for pl in pipelines:
        if owner.setdefault(pl.name, pl.family) != pl.family:
            raise ConfigError(f"{path}: pipelines: {pl.name!r} is both pipeline {owner[pl.name]!r}'s and pipeline "
                              f"{pl.family!r}'s name; their runs would overwrite each other: rename one (without "
                              "'[...]', which grid points and seeds add)")


def _notes(sizes_cache: dict, tasks: list[str], allow_network: bool) -> list[str]:
    """What a dry run could not check (a model not cached locally, a hub task)."""
    uncached = dict.fromkeys(k[1] if isinstance(k, tuple) else k for k, cfg in sizes_cache.items() if cfg is None)
    notes = [f"model {m!r} is not in the local cache: it will be fetched at run time (its group sizes are checked then)"
             for m in uncached]
    for task in tasks if not allow_network else []:
        if task.startswith("hf:"):
            notes.append(f"task {task!r}: not checked for a local copy (--dry-run); a real run refuses it at once "
                         "where it is not cached and the hub is off or unreachable")
    return notes


def _executor(path: Path, raw: dict) -> dict:
    """The ``executor:`` section (where and with what resources stage jobs run), validated."""
    executor = raw.get("executor") or {}
    if not isinstance(executor, dict):
        raise ConfigError(f"{path}: executor: expected a mapping of {', '.join(EXECUTOR_KEYS)}, got {executor!r}")
    _check_keys(path, "executor", executor, EXECUTOR_KEYS)
    for k in ("time_min", "gpus", "cpus", "mem_gb"):
        if k in executor and (isinstance(executor[k], bool) or not isinstance(executor[k], (int, float))
                              or executor[k] < 0):
            raise ConfigError(f"{path}: executor.{k}: {executor[k]!r} must be a number >= 0 ({EXECUTOR_KEYS[k]})")
    return dict(executor)


def _final(path: Path, raw: dict) -> bool:
    final = raw.get("final", False)
    if not isinstance(final, bool):
        raise ConfigError(f"{path}: final: {final!r}; true (this study's run is the one its findings stand on) or false")
    return final

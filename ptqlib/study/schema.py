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
(``target_modules``). The parameters of each stage kind are the dataclasses of ``ptqlib.study.params``: their
field comments are the documentation, and ``__post_init__`` validates each value.
A finetune setting given as ``{select: [candidates], metric: field_f1}`` (in a stage or in
``defaults.finetune``; one per pipeline) is chosen on the task's validation split: each candidate
trains at the first seed and is scored on validation (pipelines ``<name>~select[lr=...]``), and
the best one is the value of the pipeline's test-set runs (all seeds). See ``ptqlib.study.selection``.
Errors are ``ConfigError`` naming file, key, bad value and what is valid, raised before any stage runs.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import re
from pathlib import Path

import yaml

from ptqlib.errors import ConfigError
from ptqlib.methods import finetune_methods, quantize_methods
from ptqlib.seeding import derive_seed
from ptqlib.study.checks import check_pipeline
from ptqlib.study.choices import check_selects, split_selection, take_select
from ptqlib.study.claims_spec import checked_claims
from ptqlib.study.kinds import KINDS
from ptqlib.study.loader import StudyLoader
from ptqlib.study.loader import check_keys as _check_keys
from ptqlib.study.params import LIST_KEYS, fields_of, foreign_settings
from ptqlib.study.pipeline import Pipeline, Stage, Study

TOP_KEYS = {"study", "description", "model", "task", "seeds", "defaults", "pipelines", "claims", "executor", "final",
            "selection_seed"}
# the `executor:` section (run --executor slurm): where and with what resources each stage job runs
EXECUTOR_KEYS = {"partition": "SLURM partition", "account": "SLURM account", "qos": "SLURM QOS",
                 "time_min": "minutes per stage job", "gpus": "GPUs per stage job", "cpus": "CPU cores per stage job",
                 "mem_gb": "memory per stage job (GB)", "constraint": "SLURM node constraint"}


MAX_NAME = 100  # characters of a study name (a folder reports/<study>/; a path component has at most 255 bytes)


def _where(path, *keys) -> str:
    return f"{path}: " + ".".join(str(k) for k in keys if k != "")


def _normalise_stage(path, where: str, entry) -> tuple[str, dict]:
    if not isinstance(entry, dict) or len(entry) != 1:
        raise ConfigError(f"{path}: {where}: a stage is a one-key mapping such as {{quantize: nf4}}, got {entry!r}")
    (kind, params), = entry.items()
    if kind not in KINDS:
        inner = ", ".join(k for k in KINDS if k != "evaluate")
        raise ConfigError(f"{path}: {where}: unknown stage {kind!r}; valid: {inner}, and evaluate "
                          "as the last entry (it is implicit; the entry overrides defaults.evaluate)")
    if isinstance(params, str):
        params = {"method": params}
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise ConfigError(f"{path}: {where}.{kind}: expected a mapping or a method name, got {params!r}")
    _check_keys(path, f"{where}.{kind}", params, fields_of(KINDS[kind].params))
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
        default = fields_of(cls)[k].default
        if default is dataclasses.MISSING or v is None:
            continue
        ok = (isinstance(v, type(default)) or (isinstance(default, float) and isinstance(v, int))) and not (
            isinstance(v, bool) and not isinstance(default, bool))
        if not ok:
            raise ConfigError(
                f"{path}: {where}.{k}: {v!r} has type {type(v).__name__}; expected {type(default).__name__}"
            )


def _method(kind: str, params: dict):
    """A stage's method: its own or its defaults' value, else the kind's default (None: no methods)."""
    default = fields_of(KINDS[kind].params).get("method")
    return params.get("method", default.default if default else None)


def quantizes(stage: Stage) -> bool:
    """Does the stage make a quantized model from a float one (PTQ, or a method that trains into a grid)?"""
    if stage.kind == "quantize":
        return True
    return stage.kind == "finetune" and finetune_methods()[stage.params["method"]].gives in ("quantized", "merged")


def _at(point: dict, i: int, params: dict, key: str):
    """Stage ``i``'s value of ``key`` at a grid ``point`` (else its params', else the default)."""
    default = fields_of(KINDS["quantize"].params)[key].default
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
    if kind == "quantize" and quantize_methods()[p["method"]].fixed_precision:
        p["precision"] = quantize_methods()[p["method"]].fixed_precision  # what it computes in (not in its id)
    if kind == "quantize" and p["calib_seed"] == -1:
        p["calib_seed"] = seed if quantize_methods()[p["method"]].calibration else 0
    return p


def load_study(path: str | Path, check_models: bool = True, allow_network: bool = True) -> Study:
    """Parse, validate and expand a study file. Raises ConfigError before anything runs.

    ``allow_network=False`` (``--dry-run``): a hub model that is not cached locally is not fetched;
    its layer-size checks are left to run time and noted in ``Study.notes``.
    """
    from ptqlib.data import check_task, load_task
    from ptqlib.models import check_model_name, linear_input_sizes, model_config

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study file {path} not found")
    try:
        raw = yaml.load(path.read_text(), Loader=StudyLoader)  # noqa: S506 — a SafeLoader (below)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping with keys {', '.join(sorted(TOP_KEYS))}")
    _check_keys(path, "top level", raw, TOP_KEYS)
    if "pipelines" not in raw or not isinstance(raw["pipelines"], dict) or not raw["pipelines"]:
        raise ConfigError(f"{path}: pipelines: a non-empty mapping of name -> list of stages is required")
    name = str(raw.get("study", path.stem))
    if len(name) > MAX_NAME:
        raise ConfigError(f"{path}: study: a name of {len(name)} characters ({name[:40]}...); at most {MAX_NAME} "
                          "(it names the folder reports/<study>/)")
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
    sel_seed = raw.get("selection_seed")  # the selections' training seed; None: the first of seeds
    if sel_seed is not None and (isinstance(sel_seed, bool) or not isinstance(sel_seed, int) or sel_seed < 0):
        raise ConfigError(f"{path}: selection_seed: {sel_seed!r} is not an integer >= 0 (a seed no test pipeline uses, "
                          "e.g. 100)")
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
    _check_keys(path, "defaults", defaults, KINDS)
    for kind, d in defaults.items():
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: defaults.{kind}: expected a mapping, got {d!r}")
        _check_keys(path, f"defaults.{kind}", d, fields_of(KINDS[kind].params))
        check_selects(path, f"defaults.{kind}", kind, d)

    sizes_cache: dict[str, dict] = {}
    pipelines: list[Pipeline] = []
    selections: list = []
    for pname, stages in raw["pipelines"].items():
        pname = str(pname)  # `1:` is an int key in YAML; claims name pipelines as strings
        where = f"pipelines.{pname}"
        if "~" in str(pname):
            raise ConfigError(f"{path}: {where}: '~' is reserved in pipeline names (selection pipelines are "
                              "<name>~select[...]); rename it")
        if stages is None:
            stages = []
        if not isinstance(stages, list):
            raise ConfigError(f"{path}: {where}: expected a list of stages, got {stages!r}")
        parsed = []
        explicit: list[set] = []  # each stage's own keys (the rest come from defaults)
        eval_over: dict = {}
        for i, entry in enumerate(stages):
            kind, params = _normalise_stage(path, f"{where}[{i}]", entry)
            check_selects(path, f"{where}[{i}].{kind}", kind, params)
            if kind == "evaluate":
                if i != len(stages) - 1:
                    raise ConfigError(f"{path}: {where}[{i}]: evaluate can only be the last entry (every pipeline "
                                      "ends with one); move it to the end")
                eval_over = params
                continue
            parsed.append((kind, {**copy.deepcopy(defaults.get(kind, {})), **params}))
            explicit.append(set(params))
        parsed.append(("evaluate", {**copy.deepcopy(defaults.get("evaluate", {})), **eval_over}))
        explicit.append(set(eval_over))
        for (kind, params), own in zip(parsed, explicit):
            # defaults give a method's option (a value, a grid, a select) to the stages whose method reads it
            for k in foreign_settings(kind, _method(kind, params)) - own:
                params.pop(k, None)
        select = take_select(path, where, parsed, stages)  # its candidates become a grid axis, split off below
        start = len(pipelines)
        # grid axes: every list value that is not list-valued by nature, per stage
        axes: dict[str, list] = {}
        for i, (kind, params) in enumerate(parsed):
            for k, v in params.items():
                if isinstance(v, list) and k not in LIST_KEYS:
                    if k == "draws":
                        raise ConfigError(f"{path}: {where}[{i}].{kind}.draws: {v!r} is a list; draws is a number of "
                                          "calibration draws per seed (e.g. 2), not a grid")
                    if not v:
                        raise ConfigError(f"{path}: {where}[{i}].{kind}.{k}: an empty list gives an empty grid")
                    if len({repr(x) for x in v}) < len(v):
                        raise ConfigError(f"{path}: {where}[{i}].{kind}.{k}: {v!r} repeats a value; each grid value "
                                          "once (a repeat would duplicate report rows)")
                    axes[f"{i}.{k}"] = v
        trains = any(KINDS[kind].draws for kind, _ in parsed)
        names: set[str] = set()
        for model in models:
            for point in _grid(axes) or [{}]:
                # a pipeline is replicated over the seeds when a stage draws from the seed: training,
                # or a calibration left at the pipeline's seed (each seed its own GPTQ draw)
                draws = trains or any(
                    kind == "quantize" and _at(point, i, params, "calib_seed") == -1
                    and getattr(quantize_methods().get(_at(point, i, params, "method")), "calibration", False)
                    for i, (kind, params) in enumerate(parsed))
                # calibration draws per seed (``draws: K`` on a calibrating quantize stage): draw 0 keeps the
                # pipeline's seed as its calib_seed (the stage ids of a study without draws), draw k a derived one
                n_draws = max([int(_at(point, i, params, "draws") or 1) for i, (kind, params) in enumerate(parsed)
                               if kind == "quantize"] or [1])
                # a select trains its candidates at selection_seed, beside the test seeds
                run_seeds = seeds + [sel_seed] if select and sel_seed is not None and sel_seed not in seeds else seeds
                for seed, draw in ((s, k) for s in (run_seeds if draws else seeds[:1]) for k in range(n_draws)):
                    built, label = [], {}
                    for i, (kind, params) in enumerate(parsed):
                        p = dict(params)
                        for key, val in point.items():
                            si, k = key.split(".", 1)
                            if int(si) == i:
                                p[k] = val
                                label[k] = val
                        # the same where the method is a grid axis: then the stage's own options too go only
                        # to the points whose method reads them
                        own = set() if f"{i}.method" in point else explicit[i]
                        for k in foreign_settings(kind, _method(kind, p)) - own:
                            p.pop(k, None)
                            if f"{i}.{k}" in point:
                                label.pop(k, None)  # an axis this point's method does not read
                        swhere = f"{where}[{i}].{kind}" if kind != "evaluate" else "defaults.evaluate"
                        _check_types(KINDS[kind].params, path, swhere, p)
                        obj = _build(KINDS[kind].params, path, swhere, p)
                        resolved = _resolve(path, swhere, kind, dataclasses.asdict(obj), int(seed))
                        if kind == "quantize":
                            resolved.pop("draws")  # how the pipeline is replicated, not what the stage computes
                            if draw and p.get("calib_seed", -1) == -1 and resolved["calib_seed"] == int(seed):
                                resolved["calib_seed"] = derive_seed(int(seed), "calibration", str(draw))
                        built.append(Stage(kind, resolved))
                    if not any(quantizes(st) for st in built) or built[-1].params["runtime"] != "torch":
                        built[-1].params["kl_reference"] = False  # nothing to compare with (or llama.cpp)
                    check_pipeline(path, where, built, str(model), sizes_cache, linear_input_sizes,
                                    functools.partial(model_config, allow_network=allow_network), check_models)
                    if len(models) > 1:
                        label["model"] = model
                    if draws and len(run_seeds) > 1:
                        label["seed"] = seed
                    if n_draws > 1:
                        label["draw"] = draw
                    suffix = "[" + ",".join(f"{k}={v}" for k, v in label.items()) + "]" if label else ""
                    if f"{pname}{suffix}" in names:
                        continue  # the same stages as another point (it differs only in an option not read here)
                    names.add(f"{pname}{suffix}")
                    pipelines.append(Pipeline(f"{pname}{suffix}", pname, str(model), task, int(seed), label, built))
        if select:
            pipelines[start:], sels = split_selection(path, pipelines[start:], select,
                                                      int(seeds[0] if sel_seed is None else sel_seed), set(seeds))
            selections += sels
    if selections and task.startswith("jsonl:"):  # before any candidate trains, not at its validation evaluate
        try:
            load_task(task, "validation", 1)
        except ConfigError as e:
            raise ConfigError(f"{path}: task: {e}; the study selects a setting on the validation split") from None
    owner: dict[str, str] = {}
    for pl in pipelines:  # a pipeline named like another's grid point ("ft[seed=0]" beside ft's seeds)
        if owner.setdefault(pl.name, pl.family) != pl.family:
            raise ConfigError(f"{path}: pipelines: {pl.name!r} is both pipeline {owner[pl.name]!r}'s and pipeline "
                              f"{pl.family!r}'s name; their runs would overwrite each other: rename one (without "
                              "'[...]', which grid points and seeds add)")
    claims = checked_claims(path, raw)
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
    final = raw.get("final", False)
    if not isinstance(final, bool):
        raise ConfigError(f"{path}: final: {final!r}; true (this study's run is the one its findings stand on) or false")
    return Study(name, path, str(raw.get("description", "")), pipelines, claims, notes, dict(executor),
                 selections=selections, final=final)

"""A study file's pipelines expanded into runs: each entry's stages parsed over ``defaults``, its grid axes,
seeds and calibration draws multiplied out, every stage's parameters built (the dataclasses of
``ptqlib.study.params`` validate them) and resolved for its id, and its select split into selection and
test-set pipelines (``ptqlib.study.choices``). ``schema.load_study`` calls :func:`expand_pipeline` once per
entry of ``pipelines:``."""
from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
from dataclasses import dataclass

from ptqlib.errors import ConfigError
from ptqlib.methods import DEFAULT_QUANTIZE
from ptqlib.study.checks import check_pipeline
from ptqlib.study.choices import check_selects, split_selection, take_select
from ptqlib.study.kinds import IMPLICIT, KINDS, quantizes
from ptqlib.study.loader import check_keys as _check_keys
from ptqlib.study.params import LIST_KEYS, fields_of, foreign_settings
from ptqlib.study.pipeline import Pipeline, Stage


@dataclass(frozen=True)
class Header:
    """What every pipeline of a study shares: its models and tasks (a study sweeps both: each (model, task) is a
    cell, and a claim is decided per cell), seeds and the selections' seed."""

    models: list
    tasks: list[str]
    seeds: list[int]
    selection_seed: int | None


def _normalise_stage(path, where: str, entry) -> tuple[str, dict]:
    if not isinstance(entry, dict) or len(entry) != 1:
        raise ConfigError(f"{path}: {where}: a stage is a one-key mapping such as "
                          f"{{quantize: {DEFAULT_QUANTIZE}}}, got {entry!r}")
    (kind, params), = entry.items()
    if kind not in KINDS:
        inner = ", ".join(k for k, sk in KINDS.items() if not sk.implicit)
        raise ConfigError(f"{path}: {where}: unknown stage {kind!r}; valid: {inner}, and {IMPLICIT} "
                          f"as the last entry (it is implicit; the entry overrides defaults.{IMPLICIT})")
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


def _at(point: dict, i: int, kind: str, params: dict, key: str):
    """Stage ``i``'s value of ``key`` at a grid ``point`` (else its params', else its kind's default, else None)."""
    f = fields_of(KINDS[kind].params).get(key)
    return point.get(f"{i}.{key}", params.get(key, f.default if f else None))


def _settings_at(point: dict, i: int, kind: str, params: dict) -> dict:
    """Stage ``i``'s given settings at a grid ``point``, its method and calibration seed always (what
    ``StageKind.seeded`` reads: whether it calibrates can depend on a method's own setting, kquant's imatrix)."""
    keys = {"method", "calib_seed", *params, *(k.split(".", 1)[1] for k in point if k.startswith(f"{i}."))}
    return {k: _at(point, i, kind, params, k) for k in keys}


def _resolve(path, where: str, kind: str, p: dict, seed: int, draw: int, given: dict) -> dict:
    """Values that depend on the pipeline or the machine, made concrete for the stage id and record:
    ``precision: auto`` -> fp32 / bf16 (``ptqlib.precision``), then the kind's own (``StageKind.resolve``:
    a quantize stage's calibration seed and draw)."""
    from ptqlib.precision import resolve

    try:
        p["precision"] = resolve(p["precision"])
    except ConfigError as e:
        raise ConfigError(f"{path}: {where}.{e}") from None
    return KINDS[kind].resolve(p, seed, draw, given) if KINDS[kind].resolve else p


def _parse_stages(path, where: str, stages: list, defaults: dict) -> tuple[list[tuple[str, dict]], list[set]]:
    """(kind, params over defaults) per stage, the implicit evaluate last, and each stage's own keys; a
    default a stage's method does not read is dropped (defaults give a method's option to its stages only)."""
    parsed, explicit, eval_over = [], [], {}
    for i, entry in enumerate(stages):
        kind, params = _normalise_stage(path, f"{where}[{i}]", entry)
        check_selects(path, f"{where}[{i}].{kind}", kind, params)
        if KINDS[kind].implicit:
            if i != len(stages) - 1:
                raise ConfigError(f"{path}: {where}[{i}]: {kind} can only be the last entry (every pipeline "
                                  "ends with one); move it to the end")
            eval_over = params
            continue
        parsed.append((kind, {**copy.deepcopy(defaults.get(kind, {})), **params}))
        explicit.append(set(params))
    parsed.append((IMPLICIT, {**copy.deepcopy(defaults.get(IMPLICIT, {})), **eval_over}))
    explicit.append(set(eval_over))
    for (kind, params), own in zip(parsed, explicit):
        for k in foreign_settings(kind, _method(kind, params)) - own:
            params.pop(k, None)
    return parsed, explicit


def _axes(path, where: str, parsed: list[tuple[str, dict]]) -> dict[str, list]:
    """The grid axes ``"<stage index>.<key>" -> values``: every list value not list-valued by nature."""
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
    return axes


def _build_stages(path, where: str, parsed, explicit, point: dict, seed: int, draw: int) -> tuple[list[Stage], dict]:
    """One run's stages at a grid ``point``, ``seed`` and calibration ``draw`` -> (stages, its grid label)."""
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
        swhere = f"defaults.{kind}" if KINDS[kind].implicit else f"{where}[{i}].{kind}"
        _check_types(KINDS[kind].params, path, swhere, p)
        obj = _build(KINDS[kind].params, path, swhere, p)
        built.append(Stage(kind, _resolve(path, swhere, kind, dataclasses.asdict(obj), seed, draw, p)))
    asked = "kl_reference" in parsed[-1][1]  # set in the study (its evaluate or defaults), not the default
    if not any(quantizes(st.kind, st.params) for st in built) or (built[-1].params["runtime"] != "torch" and not asked):
        built[-1].params["kl_reference"] = False  # nothing to compare with (llama.cpp: only where the study asks)
    return built, label


def expand_pipeline(path, pname: str, stages, header: Header, defaults: dict, sizes_cache: dict,
                    check_models: bool, allow_network: bool) -> tuple[list[Pipeline], list]:
    """One entry of ``pipelines:`` -> (its runs: every model x task x grid point x seed x draw, its selections)."""
    from ptqlib.models import linear_input_sizes, model_config

    where = f"pipelines.{pname}"
    if "~" in pname:
        raise ConfigError(f"{path}: {where}: '~' is reserved in pipeline names (selection pipelines are "
                          "<name>~select[...]); rename it")
    stages = [] if stages is None else stages
    if not isinstance(stages, list):
        raise ConfigError(f"{path}: {where}: expected a list of stages, got {stages!r}")
    parsed, explicit = _parse_stages(path, where, stages, defaults)
    select = take_select(path, where, parsed, stages)  # its candidates become a grid axis, split off below
    axes = _axes(path, where, parsed)
    trains = any(KINDS[kind].draws for kind, _ in parsed)
    seeds, sel_seed = header.seeds, header.selection_seed
    # a select trains its candidates at selection_seed, beside the test seeds
    run_seeds = seeds + [sel_seed] if select and sel_seed is not None and sel_seed not in seeds else seeds
    pipelines: list[Pipeline] = []
    names: set[str] = set()
    for model, task in ((m, t) for m in header.models for t in header.tasks):
        for point in _grid(axes) or [{}]:
            # a pipeline is replicated over the seeds when a stage draws from the seed: training,
            # or a calibration left at the pipeline's seed (each seed its own GPTQ draw)
            draws = trains or any(KINDS[kind].seeded(_settings_at(point, i, kind, params))
                                  for i, (kind, params) in enumerate(parsed))
            # calibration draws per seed (``draws: K`` on a calibrating quantize stage): draw 0 keeps the
            # pipeline's seed as its calib_seed (the stage ids of a study without draws), draw k a derived one
            n_draws = max([int(_at(point, i, kind, params, "draws") or 1) for i, (kind, params) in enumerate(parsed)])
            for seed, draw in ((s, k) for s in (run_seeds if draws else seeds[:1]) for k in range(n_draws)):
                built, label = _build_stages(path, where, parsed, explicit, point, int(seed), draw)
                check_pipeline(path, where, built, str(model), sizes_cache, linear_input_sizes,
                               functools.partial(model_config, allow_network=allow_network), check_models, KINDS)
                if len(header.models) > 1:
                    label["model"] = model
                if len(header.tasks) > 1:
                    label["task"] = task
                if draws and len(run_seeds) > 1:
                    label["seed"] = seed
                if n_draws > 1:
                    label["draw"] = draw
                suffix = "[" + ",".join(f"{k}={v}" for k, v in label.items()) + "]" if label else ""
                if f"{pname}{suffix}" in names:
                    continue  # the same stages as another point (it differs only in an option not read here)
                names.add(f"{pname}{suffix}")
                pipelines.append(Pipeline(f"{pname}{suffix}", pname, str(model), task, int(seed), label, built))
    if not select:
        return pipelines, []
    return split_selection(path, pipelines, select, int(seeds[0] if sel_seed is None else sel_seed), set(seeds))

"""lm-evaluation-harness evaluation of an already-loaded model (MMLU, zero-shot commonsense suite).

``lm-eval`` is an optional extra (``pip install -e '.[lmeval]'``); it is imported lazily so the
rest of ptqlib never needs it. The model object is wrapped as is (``HFLM(pretrained=model)``)
rather than reloaded from a path, because the models evaluated here are often only valid in
memory: peft adapters, bitsandbytes 4-bit models, models with ptqlib ``QuantLinear`` layers.

Offline use: built-in tasks (mmlu, hellaswag, ...) download their data from the Hugging Face
hub, so they need network access or a warm ``datasets`` cache. A local task (a YAML file with
``dataset_path: json`` and ``dataset_kwargs.data_files``) runs fully offline; give its folder as
``include_path``. lm-eval passes ``data_files`` to ``datasets.load_dataset`` unchanged, so a
relative path there is resolved against the current directory, not the YAML file.
"""
from __future__ import annotations

import difflib
import functools
import math
from types import ModuleType
from typing import Any

# The zero-shot commonsense suite of the QLoRA / L4Q papers, plus MMLU (QLoRA reports it 5-shot:
# pass num_fewshot=5; lm-eval's own default for mmlu is 0-shot).
PRESETS: dict[str, list[str]] = {
    "mmlu": ["mmlu"],
    "commonsense": ["hellaswag", "piqa", "winogrande", "arc_easy", "arc_challenge", "boolq", "openbookqa"],
}

_INSTALL_HINT = "lm-eval is not installed: pip install -e '.[lmeval]' (or pip install 'lm-eval>=0.4.5')"


def _require_lm_eval() -> ModuleType:
    try:
        import lm_eval
    except ImportError as e:
        raise ImportError(_INSTALL_HINT) from e
    return lm_eval


def expand_tasks(tasks: list[str]) -> list[str]:
    """Replace preset names (``PRESETS``) by their tasks; order kept, duplicates dropped.

    A preset name that is also an lm-eval task (``mmlu``) maps to itself, so it stays valid.
    """
    if isinstance(tasks, str):  # a bare string would otherwise be split into characters
        tasks = [tasks]
    out: list[str] = []
    for name in tasks:
        for task in PRESETS.get(name, [name]):
            if task not in out:
                out.append(task)
    return out


@functools.lru_cache(maxsize=4)
def _task_manager(include_path: str | None, include_defaults: bool) -> Any:
    """A cached ``TaskManager``: indexing lm-eval's ~15k built-in YAML configs takes 15-30 s.

    YAML files added to ``include_path`` after its first use are not seen until
    ``_task_manager.cache_clear()``.
    """
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=include_defaults)


def resolve_tasks(tasks: list[str], include_path: str | None = None, include_defaults: bool = True):
    """(expanded task names, TaskManager that knows them all); ValueError naming unknown ones.

    With ``include_path``, the local folder is indexed alone first and the built-in tasks are
    only indexed when a name is not found there, so purely local runs skip the slow index.
    """
    _require_lm_eval()
    names = expand_tasks(tasks)
    if not names:
        raise ValueError("no lm-eval tasks given; name tasks or presets: " + ", ".join(sorted(PRESETS)))
    include = str(include_path) if include_path is not None else None
    candidates = []
    if include is not None:
        candidates.append((include, False))
    if include_defaults:
        candidates.append((include, True))
    if not candidates:
        raise ValueError("include_defaults=False needs an include_path with local task configs")
    for key in candidates:
        tm = _task_manager(*key)
        unknown = [n for n in names if n not in tm.all_tasks]
        if not unknown:
            return names, tm
    hints = []
    for n in unknown:
        close = difflib.get_close_matches(n, tm.all_tasks, n=3)
        hints.append(f"{n!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
    where = f"in include_path {include!r}" if not include_defaults else (
        "among lm-eval's tasks" + (f" or in include_path {include!r}" if include else ""))
    raise ValueError(
        f"unknown lm-eval task(s) {where}: {'; '.join(hints)}. Presets: {', '.join(sorted(PRESETS))}. "
        "List valid names with `lm-eval ls tasks [--include_path DIR]` (lm-eval < 0.4.10: "
        "`lm-eval --tasks list`) or `lm_eval.tasks.TaskManager().all_tasks`."
    )


def flatten_results(results: dict[str, Any]) -> dict[str, float]:
    """lm-eval's ``results["results"]`` -> ``{"lmeval.<task>.<metric>": float}``.

    lm-eval keys metrics as ``"<metric>,<filter>"``; the default filter ``none`` is dropped, any
    other is kept as a suffix (``lmeval.gsm8k.exact_match.strict-match``). Stderrs stay as
    ``<metric>_stderr``; non-numeric values (``alias``, ``"N/A"`` stderrs) are dropped. Groups
    (``mmlu``) and their subtasks (``mmlu_anatomy``, ...) all appear; leaf tasks also get
    ``lmeval.<task>.n_samples``, the number of examples actually scored (see ``limit``).
    """
    flat: dict[str, float] = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            # sample_len is a bookkeeping count that only newer lm-eval versions emit here;
            # n_samples (below) carries the same information on every version >= 0.4.5.
            if key == "sample_len" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            metric, _, filt = key.partition(",")
            name = metric if filt in ("", "none") else f"{metric}.{filt}"
            if not math.isfinite(float(value)) and metric.endswith("_stderr"):
                continue  # a one-sample subtask has no stderr; NaN would only confuse tables
            flat[f"lmeval.{task}.{name}"] = float(value)
    for task, counts in results.get("n-samples", {}).items():
        if isinstance(counts, dict) and isinstance(counts.get("effective"), int):
            flat[f"lmeval.{task}.n_samples"] = float(counts["effective"])
    return flat


def sample_units(samples: dict[str, list[dict]], flat: dict[str, float]) -> dict[str, dict[str, list[float]]]:
    """lm-eval's logged samples -> per-item units, so that claims on an lm-eval metric pair the same items across
    pipelines as task examples are paired: a group ``lmeval.<task>`` per task, a column ``lmeval.<task>.<metric>``
    per metric, items in ``doc_id`` order. Only metrics whose aggregate (``flat``) is the mean of their items
    (accuracies) become units; a corpus-level one (BLEU, F1 over the corpus) stays a run-level number."""
    out: dict[str, dict[str, list[float]]] = {}
    for task, rows in samples.items():
        cols: dict[str, list[float]] = {}
        for r in sorted(rows, key=lambda r: (r.get("filter", "none"), r["doc_id"])):
            filt = r.get("filter", "none")
            for m in r.get("metrics", []):
                v = r.get(m)
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    cols.setdefault(f"lmeval.{task}.{m}" + ("" if filt in ("", "none") else f".{filt}"), []).append(float(v))
        means = {k: v for k, v in cols.items() if k in flat and math.isclose(sum(v) / len(v), flat[k], abs_tol=1e-9)}
        if means and len({len(v) for v in means.values()}) == 1:
            out[f"lmeval.{task}"] = means
    return out


def run_lm_eval(
    model,
    tokenizer,
    tasks: list[str],
    num_fewshot: int | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    include_path: str | None = None,
    *,
    include_defaults: bool = True,
    units: dict | None = None,
    **eval_kwargs: Any,
) -> dict[str, float]:
    """Evaluate ``model`` with lm-evaluation-harness; returns ``{"lmeval.<task>.<metric>": value}``.

    Args:
        model: a loaded causal LM (transformers, peft, bitsandbytes or ptqlib-quantized), used
            in place: lm-eval puts it in eval mode and calls ``tie_weights()`` on it.
        tokenizer: its tokenizer.
        tasks: lm-eval task/group names or ``PRESETS`` keys (``"mmlu"``, ``"commonsense"``).
        num_fewshot: few-shot examples (None: each task's default, 0 for most).
        limit: at most this many examples per task (for smoke runs; not comparable scores).
        batch_size: loglikelihood batch size.
        include_path: a folder of extra task YAML files (e.g. a local offline task).
        include_defaults: also look names up among lm-eval's built-in tasks; False restricts
            the lookup to ``include_path`` and skips indexing the built-ins (15-30 s).
        units: a dict to fill with the per-item units (:func:`sample_units`; lm-eval then logs its samples).
        **eval_kwargs: passed to ``lm_eval.simple_evaluate`` (e.g. ``apply_chat_template``).

    Raises:
        ImportError: lm-eval is missing (the message names ``pip install -e '.[lmeval]'``).
        ValueError: a task name is unknown (the message names it and how to list valid ones).
        ConnectionError: a built-in task's data set is neither cached nor downloadable (offline).
    """
    lm_eval = _require_lm_eval()
    # Validate names before touching the model, so a typo fails before any evaluation work.
    names, tm = resolve_tasks(tasks, include_path, include_defaults)
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    eval_kwargs.setdefault("log_samples", units is not None)  # per-sample logs: only for the units
    try:
        results = lm_eval.simple_evaluate(
            model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit, task_manager=tm, **eval_kwargs,
        )
    except ConnectionError as e:  # datasets' "Couldn't reach '<repo>' on the Hub (OfflineModeIsEnabled)"
        raise ConnectionError(
            f"lm-eval could not load a task's data set ({e}). Built-in tasks download from the Hugging "
            "Face hub: run once online (without HF_HUB_OFFLINE/HF_DATASETS_OFFLINE) to fill the datasets "
            "cache, or evaluate a local task with include_path."
        ) from e
    if not results:  # None on non-zero distributed ranks
        return {}
    flat = flatten_results(results)
    if units is not None:
        units.update(sample_units(results.get("samples") or {}, flat))
    return flat

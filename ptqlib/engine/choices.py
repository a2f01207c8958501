"""The values that decide a selection (``ptqlib.study.selection``): a candidate's validation metric from its
evaluate stage's record, or from the report's ``selection.csv`` when the runs are gone."""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Callable

from ptqlib.errors import ConfigError


def recorded(runner) -> Callable[[str, str], float | None]:
    """``value_of`` for ``selection.resolve`` (``runner``: an ``engine.runner.Runner``): the metric in the
    record of a selection pipeline's evaluate stage when its chain is finished (NaN when recorded as None;
    a record without it is refused, naming the file), else the value in the report's ``selection.csv`` for
    the same evaluate stage id and metric (unless the runner keeps no previous report), else None."""
    previous = previous_values(runner.reports) if runner.keep_previous else {}

    def value_of(pipeline: str, metric: str) -> float | None:
        chain = runner.chains[pipeline]
        if all(runner.finished(s) for s in chain):
            metrics = runner.record(chain[-1]).get("metrics") or {}
            if metric not in metrics:  # load_study checked that the stage records it: an older or foreign record
                raise ConfigError(
                    f"{runner.runs / chain[-1] / 'metrics.json'}: the validation record of selection pipeline "
                    f"{pipeline!r} has no {metric!r} (it records {', '.join(sorted(metrics)) or 'nothing'}); a choice "
                    "by a metric that is not there would be the first candidate by default. Delete that stage "
                    "directory to evaluate it again")
            v = metrics[metric]
            return math.nan if v is None else float(v)
        return previous.get((pipeline, chain[-1], metric))  # the same metric: a changed select metric re-runs

    return value_of


def previous_values(reports: Path) -> dict[tuple[str, str, str], float]:
    """(selection pipeline, evaluate stage id, metric) -> validation value, from ``reports/selection.csv`` (the id
    does not change with the select's metric: keyed on it alone, an old metric's values were reused)."""
    path = Path(reports) / "selection.csv"
    if not path.exists():
        return {}
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("validation") not in (None, "")]
    try:
        return {(r["pipeline"], r["eval_stage"], r.get("metric", "")): float(r["validation"]) for r in rows}
    except (KeyError, ValueError) as e:
        raise ConfigError(f"{path}: a row without a pipeline / eval_stage or a validation that is not a number ({e}); "
                          "fix or delete the file (the selection stages then run again)") from None

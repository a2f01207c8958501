"""The values that decide a selection (``ptqlib.study.selection``): a candidate's validation metric from its
evaluate stage's record, or, when the runs are gone, what the caller's reporter says an earlier report
recorded for the same evaluate stage (``Reporter.previous_choices``; the engine reads no report file)."""
from __future__ import annotations

import math
from typing import Callable

from ptqlib.data import primary_metric
from ptqlib.errors import ConfigError
from ptqlib.metrics import METRICS


def recorded(runner) -> Callable[[str, str], float | None]:
    """``value_of`` for ``selection.resolve`` (``runner``: an ``engine.runner.Runner``): the metric in the
    record of a selection pipeline's evaluate stage when its chain is finished (NaN when recorded as None;
    a record without it is refused, naming the file), else the value the reporter's earlier report holds
    for the same evaluate stage id and metric (unless the runner keeps no previous report), else None."""
    keep = runner.keep_previous and runner.reporter is not None
    previous = runner.reporter.previous_choices(runner) if keep else {}

    def value_of(pipeline: str, metric: str) -> float | None:
        chain = runner.chains[pipeline]
        if all(runner.finished(s) for s in chain):
            metrics = runner.record(chain[-1]).get("metrics") or {}
            if METRICS[metric].per_task:  # the task's own score (metrics.task_score): read, not recorded
                metric = primary_metric(runner.nodes[chain[-1]].task)
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

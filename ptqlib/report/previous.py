"""The report already written: a pipeline run whose stages are not in ``runs/`` keeps its row from it.

A fresh clone, a cache cleaned or lost, or another machine's runs: a pipeline run whose stages are not in
``runs/`` keeps its row from the report already in ``reports/<study>/`` when that row's evaluate stage id is the one
the study computes now (the id hashes every parameter of the chain, so the row is the same computation). Failing
that, it takes the row of another study's report under ``reports/`` with that evaluate stage id, as studies share
``runs/`` (:func:`previous_report`). ``tables.write_results`` calls :func:`keep_previous`.
"""
from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ptqlib.errors import ConfigError
from ptqlib.metrics import METRICS

if TYPE_CHECKING:
    from ptqlib.engine.runner import Runner

log = logging.getLogger("ptqlib.report.tables")


@dataclass
class PreviousReport:
    """The finished pipeline runs of the reports already written, as written."""

    rows: dict[str, dict]  # pipeline -> its results.csv row in this study's report (status ok)
    units: dict[str, list[dict]]  # pipeline -> its units.csv rows
    # evaluate stage id -> (study, results.csv row, units.csv rows) in the other studies' reports
    others: dict[str, tuple[str, dict, list[dict]]] = field(default_factory=dict)


def _read_rows(reports: Path) -> dict[str, dict]:
    """pipeline -> its finished results.csv row (with an evaluate stage id) of one study's report."""
    if not (reports / "results.csv").exists():
        return {}
    with open(reports / "results.csv", newline="", encoding="utf-8") as f:
        return {r["pipeline"]: r for r in csv.DictReader(f) if r.get("status") == "ok" and r.get("eval_stage")}


def _read_report(reports: Path) -> tuple[dict[str, dict], dict[str, list[dict]]]:
    rows = _read_rows(reports)
    units: dict[str, list[dict]] = {}
    if (reports / "units.csv").exists():
        with open(reports / "units.csv", newline="", encoding="utf-8") as f:
            for r in csv.DictReader(f):
                units.setdefault(r["pipeline"], []).append(r)
    return rows, units


def _preference(d: Path) -> tuple:
    """Which sibling report a shared evaluate stage id is taken from first: a study declared final (its run is
    the one its findings stand on), then one whose rows name their machine, then name order."""
    try:
        final = bool(json.loads((d / "study.json").read_text()).get("final"))
    except (OSError, ValueError):
        final = False
    try:
        with open(d / "results.csv", newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        header = []  # a damaged report: last, and skipped with a warning when it is read
    return (not final, "machines" not in header, d.name)


def _differ(a: dict, b: dict) -> bool:
    """Do two results rows of one evaluate stage id hold other scores (per-unit metrics both recorded; times and
    sizes vary from run to run, and a report written before a metric existed lacks it)?"""
    both = [m.name for m in METRICS.values() if m.statistic and a.get(m.name) not in (None, "")
            and b.get(m.name) not in (None, "")]
    return any(str(a[k]) != str(b[k]) and float(a[k]) != float(b[k]) for k in both)  # "nan" equals "nan"


def previous_report(reports: Path) -> PreviousReport:
    """Read ``results.csv`` and ``units.csv`` of ``reports`` (empty when absent) and of every
    sibling study's report, indexed by evaluate stage id. Where several reports hold one id, the
    declared-final study's wins, then a report that records its machines, then name order (the same
    id computed on another CPU or by older code can hold other numbers: a warning names them)."""
    rows, units = _read_report(reports)
    found: dict[str, tuple[str, dict, list[dict]]] = {}
    differ: dict[str, set[str]] = {}
    if reports.parent.is_dir():
        siblings = [d for d in reports.parent.iterdir()
                    if d.resolve() != reports.resolve() and (d / "results.csv").exists()]
        for d in sorted(siblings, key=_preference):
            try:
                orows, ounits = _read_report(d)
            except (UnicodeDecodeError, csv.Error, KeyError) as e:  # another study's damaged report: not ours to fail on
                log.warning("skipping %s: its results.csv / units.csv cannot be read (%s)", d, e)
                continue
            for pipeline, row in orows.items():
                first = found.setdefault(row["eval_stage"], (d.name, row, ounits.get(pipeline, [])))
                if first[0] != d.name and _differ(first[1], row):
                    differ.setdefault(first[0], set()).add(d.name)
    for taken, others in differ.items():
        log.warning("reports %s hold evaluate stage ids of report %s with other numbers (another CPU or older "
                    "code); where a row is taken from another study's report, %s's are used", ", ".join(sorted(others)),
                    taken, taken)
    return PreviousReport(rows, units, found)


def keep_previous(runner: "Runner", rows: list[dict], prev: PreviousReport) -> dict[str, list[dict]]:
    """Replace, in place, each unfinished row by the previous report's finished row of the same
    pipeline and evaluate stage id, or else by another study's row of that evaluate stage id
    (renamed to this pipeline); returns the kept pipelines' units.csv rows. The ``source`` column
    says ``runs``, ``previous report`` or ``report <study>``."""
    kept: dict[str, list[dict]] = {}
    for i, row in enumerate(rows):
        p = row["pipeline"]
        old = prev.rows.get(p)
        if row["status"] == "ok":
            row["source"] = "runs"
        elif old is not None and old["eval_stage"] == row["eval_stage"]:
            rows[i] = {**old, "source": "previous report"}
            kept[p] = prev.units.get(p, [])
        elif row["eval_stage"] in prev.others:
            study, old, units = prev.others[row["eval_stage"]]
            # the same computation under another study's name: this study's names and grid, its values
            own = {k: v for k, v in row.items() if k in ("pipeline", "family", "model", "task", "seed")
                   or k.startswith("grid.")}
            rows[i] = {**{k: v for k, v in old.items() if not k.startswith("grid.")}, **own,
                       "source": f"report {study}"}
            kept[p] = [{**u, "pipeline": p, "family": row["family"]} for u in units]
        else:
            row["source"] = "runs"
    by_name = {r["pipeline"]: r for r in rows}
    for p, units in kept.items():  # a units.csv cut short would be rewritten with the rows it lost
        if why := _short_units(runner, by_name[p], units):
            raise ConfigError(f"{runner.reports / 'units.csv'} (or the report it was kept from): pipeline {p!r} has "
                              f"{why}; the file does not match its runs: restore it (git checkout) or re-run the "
                              "stages (--fresh-report), nothing was rewritten")
    # a row the study can no longer reproduce (its chain changed) and that nothing replaces
    stale = [r["pipeline"] for r in rows if r["status"] != "ok" and r["pipeline"] in prev.rows
             and r["pipeline"] not in kept]
    if kept:
        log.info("kept %d pipeline runs from the reports in %s (same stage ids, stages not in %s): %s",
                 len(kept), runner.reports.parent, runner.runs,
                 ", ".join(f"{r['pipeline']} ({r['source']})" for r in rows if r["pipeline"] in kept))
    if stale:
        log.warning("dropped %d pipeline runs of the previous report whose stages the study file has since "
                    "changed (another evaluate stage id): %s", len(stale), ", ".join(stale))
    return kept


def auto_elsewhere(study, runner: "Runner") -> tuple[str, int] | None:
    """(precision, rows): where this machine resolves ``precision: auto`` otherwise than the machine that wrote the
    report in ``runner.reports`` did, the precision ``auto`` was there and how many of the report's rows have the
    stage ids of that precision and not of this machine's (the resolved precision enters the ids, so those rows
    would be dropped as stale); None when no row is stale, or none so. ``study`` is reloaded from its file with
    ``auto`` resolved the other way (``precision.auto_as``), its selections read from the report as ``runner``'s."""
    from ptqlib import precision
    from ptqlib.study.schema import load_study

    rows = _read_rows(runner.reports)  # this study's rows only: no sibling report or units.csv at a run's start
    stale = [p for p, r in rows.items() if runner.chains.get(p, [""])[-1] != r["eval_stage"]]
    if not stale:
        return None
    other = "fp32" if precision.resolve("auto") == "bf16" else "bf16"
    with precision.auto_as(other):
        again = type(runner)(load_study(study.path, allow_network=False), runner.runs, runner.reports.parent,
                             reporter=runner.reporter)
    n = sum(again.chains.get(p, [""])[-1] == rows[p]["eval_stage"] for p in stale)
    return (other, n) if n else None


def _short_units(runner: "Runner", row: dict, units: list[dict]) -> str:
    """What a kept pipeline run's units lack against its own results row ("" when complete): as many task
    examples as its ``task_examples``, and for each perplexity it reports, its evaluate stage's ``ppl_samples``
    windows."""
    ev = runner.nodes[runner.chains[row["pipeline"]][-1]].params
    count: dict[str, int] = {}
    for u in units:
        count[str(u.get("group", ""))] = count.get(str(u.get("group", "")), 0) + 1
    short = []
    for src in ev.get("ppl_sources", []):
        g = "ppl" if src == "pydoc" else f"ppl_{src}"
        if row.get(g) not in (None, "") and count.get(g, 0) != ev["ppl_samples"]:
            short.append(f"{count.get(g, 0)} of {ev['ppl_samples']} {g} windows")
    try:
        n = float(row.get("task_examples"))
    except (TypeError, ValueError):  # absent or empty: no generation
        n = float("nan")
    if n == n and count.get("task", 0) != int(n):
        short.append(f"{count.get('task', 0)} of {int(n)} task examples")
    return "; ".join(short)

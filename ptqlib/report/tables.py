"""A study's results and report: ``results.csv``, ``units.csv``, the stage pages, ``index.html``.

Reads the finished records of a ``Runner``'s graph; runs no stage (``python -m ptqlib analyse`` is this module alone).
A pipeline run whose stages are not in ``runs/`` (a fresh clone, a cache cleaned or lost, another machine's runs)
keeps its row from the report already in ``reports/<study>/`` when that row's evaluate stage id is the one the study
computes now: the id hashes every parameter of the chain, so the row is the same computation. Failing that, it takes
the row of another study's report under ``reports/`` with that evaluate stage id, as studies share ``runs/``
(``previous_report``). The claims' statistics live in ``ptqlib.report.analysis``; the page is the ``04_analyse``
notebook, executed by papermill and rendered without its code. Selection pipelines (``ptqlib.study.selection``) are no
rows of ``results.csv`` / ``units.csv``: their validation scores are ``selection.csv``.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ptqlib.engine.choices import recorded
from ptqlib.engine.record import complete, machine_label, versions_label
from ptqlib.engine.stage import ROOT, kernel_manager_kwargs, render_html, short_error, stage_environment
from ptqlib.errors import ConfigError
from ptqlib.files import copy_atomic, write_atomic, write_json_atomic
from ptqlib.metrics import METRICS, task_score
from ptqlib.study import selection
from ptqlib.study.kinds import KINDS

if TYPE_CHECKING:
    from ptqlib.engine.runner import Runner

log = logging.getLogger("ptqlib.report.tables")

ANALYSE = "04_analyse.ipynb"


def study_rows(runner: "Runner") -> list[dict]:
    """One row per pipeline x grid point with its parameters and metrics."""
    rows = []
    for pl in runner.study.pipelines:
        if selection.is_selection(pl):  # validation-split runs: selection.csv, never a claim's row
            continue
        chain = runner.chains[pl.name]
        row: dict = {"pipeline": pl.name, "family": pl.family, "model": pl.model, "task": pl.task,
                     "seed": pl.seed, **{f"grid.{k}": v for k, v in pl.grid.items()},
                     "stages": " -> ".join(runner.nodes[s].label() for s in chain), "eval_stage": chain[-1]}
        statuses = []
        labels: dict[str, None] = {}  # the package versions the chain's stages ran under, in order
        machines: dict[str, None] = {}  # the machines they ran on (CPU model, GPU, threads), in order
        seen_kinds: dict[str, int] = {}
        for sid in chain:
            rec = runner.record(sid)
            ok = complete(rec)  # a partial record (valid JSON, keys missing) counts as not finished
            statuses.append("ok" if ok else "incomplete" if (rec or {}).get("status") == "ok"
                            else (rec or {}).get("status", "missing"))
            if not ok:
                continue
            node = runner.nodes[sid]
            if label := versions_label(rec.get("versions")):
                labels[label] = None
            machines[machine_label(rec.get("device"))] = None
            # finetune, finetune2, ...: a pipeline such as FT -> PTQ -> QLoRA trains twice
            seen_kinds[node.kind] = seen_kinds.get(node.kind, 0) + 1
            prefix = node.kind + (str(seen_kinds[node.kind]) if seen_kinds[node.kind] > 1 else "")
            if KINDS[node.kind].implicit:  # the evaluate stage's metrics: results.csv's unprefixed columns
                row.update({k: v for k, v in rec["metrics"].items()})
                if (score := task_score(rec["metrics"], pl.task)) is not None:
                    row["task_score"] = score
            else:
                for k, v in rec["metrics"].items():
                    row[f"{prefix}.{k}"] = v
                for k, v in node.params.items():
                    if k != "target_modules":
                        row[f"{prefix}.{k}"] = v
            row["wall_s." + prefix] = rec["timings"]["wall_s"]  # each stage's own cost, in chain order
            row["wall_s.total"] = row.get("wall_s.total", 0) + rec["timings"]["wall_s"]
        row["versions"] = " | ".join(labels)  # more than one: the chain mixes package versions
        row["machines"] = " | ".join(machines)  # more than one: the chain's stages ran on different machines
        row["status"] = "ok" if all(s == "ok" for s in statuses) else next(s for s in statuses if s != "ok")
        rows.append(row)
    return rows


@dataclass
class PreviousReport:
    """The finished pipeline runs of the reports already written, as written."""

    rows: dict[str, dict]  # pipeline -> its results.csv row in this study's report (status ok)
    units: dict[str, list[dict]]  # pipeline -> its units.csv rows
    # evaluate stage id -> (study, results.csv row, units.csv rows) in the other studies' reports
    others: dict[str, tuple[str, dict, list[dict]]] = field(default_factory=dict)


def _read_report(reports: Path) -> tuple[dict[str, dict], dict[str, list[dict]]]:
    rows: dict[str, dict] = {}
    units: dict[str, list[dict]] = {}
    if (reports / "results.csv").exists():
        with open(reports / "results.csv", newline="", encoding="utf-8") as f:
            rows = {r["pipeline"]: r for r in csv.DictReader(f) if r.get("status") == "ok" and r.get("eval_stage")}
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


def write_results(runner: "Runner") -> Path:
    runner.reports.mkdir(parents=True, exist_ok=True)
    prev = previous_report(runner.reports) if runner.keep_previous else PreviousReport({}, {})
    rows = study_rows(runner)
    kept = keep_previous(runner, rows, prev)
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    path = _write_csv(runner.reports / "results.csv", keys, rows)
    write_units(runner, kept)
    write_selection(runner)
    # per-stage pages, linked from the index
    pages = runner.reports / "stages"
    pages.mkdir(exist_ok=True)
    for sid in {s for c in runner.chains.values() for s in c}:
        src = runner.runs / sid / "report.html"
        if src.exists() and (not (pages / f"{sid}.html").exists()
                             or src.stat().st_mtime > (pages / f"{sid}.html").stat().st_mtime):
            copy_atomic(src, pages / f"{sid}.html")  # a full disk leaves the old page, never half a new one
    # in pipeline order (the order a reader follows), each stage once, at its first pipeline
    order = list(dict.fromkeys(s for p in runner.study.pipelines for s in runner.chains[p.name]))
    source = {r["pipeline"]: r["source"] for r in rows}
    kept_stages = {s: source[p] for p in kept for s in runner.chains[p]}
    stages = {sid: {"position": i, "label": runner.nodes[sid].label(), "kind": runner.nodes[sid].kind,
                    "pipelines": runner.nodes[sid].pipelines,
                    "status": (runner.record(sid) or {}).get("status")
                    or (f"ok ({kept_stages[sid]})" if sid in kept_stages else "missing")}
              for i, sid in enumerate(order)}
    write_json_atomic(runner.reports / "stages.json", stages)
    write_json_atomic(runner.reports / "study.json", {
        "name": runner.study.name, "file": str(runner.study.path), "description": runner.study.description,
        "runs_dir": str(runner.runs.resolve()), "final": runner.study.final,
        "claims": runner.study.claims, "pipelines": {p.name: runner.chains[p.name] for p in runner.study.pipelines}})
    return path


def write_units(runner: "Runner", kept: dict[str, list[dict]] | None = None) -> Path:
    """``units.csv``: every finished pipeline run's per-unit scores (task examples, ppl windows), one row per
    (pipeline run, group, unit) with the columns of ``metrics.example_scores`` (and ``task_score``) and ``nll`` /
    ``tokens``; the claims read it. ``kept``: the rows of runs kept from the previous report (``keep_previous``).
    """
    keys = ["pipeline", "family", "seed", "group", "unit"]
    rows: list[dict] = []
    for pl in runner.study.pipelines:
        chain = runner.chains[pl.name]
        if selection.is_selection(pl):
            continue
        if kept and pl.name in kept:
            new = kept[pl.name]
        elif all(runner.finished(s) for s in chain):
            units = (runner.record(chain[-1]).get("outputs") or {}).get("units") or {}
            new = [{"pipeline": pl.name, "family": pl.family, "seed": pl.seed, "group": group, "unit": i,
                    **{c: v[i] for c, v in cols.items()}}
                   for group, cols in units.items() for i in range(len(next(iter(cols.values()), [])))]
        else:
            continue
        for row in new:
            if row["group"] == "task" and (score := task_score(row, pl.task)) not in (None, ""):
                row["task_score"] = score  # the task's own score, one name over several tasks
            keys += [c for c in row if c not in keys]
        rows += new
    return _write_csv(runner.reports / "units.csv", keys, rows)


def write_selection(runner: "Runner") -> Path | None:
    """``selection.csv``: each select's candidates with their validation value and which one was
    chosen (:func:`selection_rows`); none (an old one removed) when the study selects nothing."""
    path = runner.reports / "selection.csv"
    if not runner.study.selections:
        path.unlink(missing_ok=True)
        return None
    return _write_csv(path, SELECTION_TABLE, selection_rows(runner))


def previous_choices(runner: "Runner") -> dict[tuple[str, str, str], float]:
    """(selection pipeline, evaluate stage id, metric) -> validation value, from the report's ``selection.csv``
    (``write_selection``'s columns): the choice of a study whose runs are gone (a fresh clone). Keyed on the
    metric too (the id does not change with the select's metric: keyed on it alone, an old metric's values
    were reused); a malformed file is refused, naming it."""
    path = runner.reports / "selection.csv"
    if not path.exists():
        return {}
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("validation") not in (None, "")]
    try:
        return {(r["pipeline"], r["eval_stage"], r.get("metric", "")): float(r["validation"]) for r in rows}
    except (KeyError, ValueError) as e:
        raise ConfigError(f"{path}: a row without a pipeline / eval_stage or a validation that is not a number ({e}); "
                          "fix or delete the file (the selection stages then run again)") from None


def _write_csv(path: Path, keys: list[str], rows: list[dict]) -> Path:
    """Write ``rows`` under the header ``keys`` to a temp file, then rename it over ``path`` (a
    reader never sees half a table)."""
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    return write_atomic(path, buf.getvalue())


def analyse(runner: "Runner", force: bool = False) -> Path | None:
    """Run 04_analyse on results.csv -> reports/<study>/index.html (cached on the csv's content, the claims,
    the notebook and the analysis code)."""
    import papermill as pm

    from ptqlib.report.analysis import analysis_code

    csv_path, units_path, sel_path = (runner.reports / f for f in ("results.csv", "units.csv", "selection.csv"))
    digest = hashlib.sha256(csv_path.read_bytes() + (units_path.read_bytes() if units_path.exists() else b"")
                            + (sel_path.read_bytes() if sel_path.exists() else b"")
                            + json.dumps(runner.study.claims, sort_keys=True).encode()
                            + (ROOT / "notebooks" / ANALYSE).read_bytes() + analysis_code()).hexdigest()[:16]
    stamp = runner.reports / ".analysis"
    index = runner.reports / "index.html"
    if not force and index.exists() and stamp.exists() and stamp.read_text() == digest:
        log.info("analysis up to date: %s", index)
        return index
    log.info("analysis -> %s", index)
    if runner.study.claims:  # how many seeds would decide each claim (plan.csv; the report shows it)
        from ptqlib.report.analysis import load_outputs
        from ptqlib.report.plan import plan_claims

        out = load_outputs(runner.reports)
        table = plan_claims(runner.study.claims, out.results, out.units, runner.chains,
                            {sid: n.kind for sid, n in runner.nodes.items()})
        write_atomic(runner.reports / "plan.csv", table.to_csv(index=False))
    else:
        from ptqlib.report.analysis import drop_claims

        drop_claims(runner.reports)
    work = runner.reports / "_analysis"
    work.mkdir(exist_ok=True)
    try:
        with stage_environment(progress=False):
            pm.execute_notebook(
                str(ROOT / "notebooks" / ANALYSE), str(work / "notebook.ipynb"),
                parameters={"study_dir": str(runner.reports.resolve()), "study": runner.study.name,
                            "description": runner.study.description},
                kernel_name=runner.kernel_name(), progress_bar=False, **kernel_manager_kwargs(cwd=work.resolve()),
            )
    except Exception as e:  # noqa: BLE001
        log.error("analysis failed: %s (see %s)", short_error(e), work / "notebook.ipynb")
        render_html(work, "index.html", exclude_input=True)
        copy_atomic(work / "index.html", index) if (work / "index.html").exists() else None
        return None
    render_html(work, "index.html", exclude_input=True)
    copy_atomic(work / "index.html", index)
    write_atomic(stamp, digest)
    return index


SELECTION_TABLE = ["family", "point", "key", "candidate", "metric", "validation", "gap", "tie", "tied", "chosen",
                   "pipeline", "eval_stage"]


def selection_rows(runner: "Runner") -> list[dict]:
    """The rows of ``selection.csv``: one per candidate of each selection (``validation``: the
    metric on the validation split, empty while not recorded; ``gap``: how far it falls short of the
    best; ``tie``: the select's declared tie margin; ``tied``: within it of the best, so the first listed of
    the tied ones was chosen; ``chosen``: True for the one used)."""
    value_of = recorded(runner)
    rows = []
    for sel in runner.study.selections:
        values = [value_of(name, sel.metric) for name in sel.pipelines]
        known = None not in values
        gaps = selection.gaps(values, sel.metric) if known else [None] * len(values)
        for i, (cand, name, v, g) in enumerate(zip(sel.candidates, sel.pipelines, values, gaps)):
            rows.append({"family": sel.family, "point": selection.suffix(sel.point)[1:-1],
                         "key": sel.key, "candidate": cand, "metric": sel.metric,
                         "validation": "" if v is None else v, "gap": "" if g is None else g, "tie": sel.tie,
                         "tied": known and selection.tied(g, sel.tie), "chosen": sel.chosen == i, "pipeline": name,
                         "eval_stage": runner.chains[name][-1]})
    return rows

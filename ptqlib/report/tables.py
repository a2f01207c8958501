"""A study's results and report: ``results.csv``, ``units.csv``, the stage pages, ``index.html``.

Reads the finished records of a ``Runner``'s graph; runs no stage (``python -m ptqlib analyse`` is this module alone).
A pipeline run whose stages are not in ``runs/`` keeps its row from the report already written
(``ptqlib.report.previous``); an interrupted run never replaces a complete report with its partial one. The claims'
statistics live in ``ptqlib.report.analysis``; the page is the ``04_analyse`` notebook, executed by papermill and
rendered without its code. Selection pipelines (``ptqlib.study.selection``) are no rows of ``results.csv`` /
``units.csv``: their validation scores are ``selection.csv``.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from ptqlib.engine.choices import recorded
from ptqlib.engine.record import complete, machine_label, versions_label
from ptqlib.engine.stage import ROOT, kernel_manager_kwargs, render_html, short_error, stage_environment
from ptqlib.errors import ConfigError
from ptqlib.files import copy_atomic, write_atomic, write_json_atomic
from ptqlib.metrics import task_score
from ptqlib.report.previous import PreviousReport, keep_previous, previous_report
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


def write_results(runner: "Runner", interrupted: bool = False) -> Path | None:
    """results.csv, units.csv, selection.csv, the stage pages and study.json of ``runner``'s study -> results.csv.

    ``interrupted`` (Ctrl-C, SIGTERM): a run cut short does not replace a complete report (every row ok, as a
    declared-final one is) with its incomplete rows; it writes nothing and returns None (its finished stages are
    cached, and the next run reports them)."""
    runner.reports.mkdir(parents=True, exist_ok=True)
    prev = previous_report(runner.reports) if runner.keep_previous else PreviousReport({}, {})
    rows = study_rows(runner)
    kept = keep_previous(runner, rows, prev)
    if interrupted and complete_report(runner.reports) and any(r["status"] != "ok" for r in rows):
        return None
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


def complete_report(reports: Path) -> bool:
    """Does ``reports`` (one study's folder) hold a results.csv whose every row finished?"""
    try:
        with open(reports / "results.csv", newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error):
        return False
    return bool(rows) and all(r.get("status") == "ok" for r in rows)


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


def reported(runner: "Runner") -> set[str]:
    """The pipelines whose result the reports already hold, so ``ptqlib run --missing`` leaves their stages out:
    a test pipeline whose finished row :func:`keep_previous` would keep (this study's report, or another's with
    the same evaluate stage id), and a selection pipeline whose validation value ``selection.csv`` records for
    its evaluate stage id. A study run over several sessions, each on a fresh clone, goes on from its committed
    partial report instead of starting again."""
    prev = previous_report(runner.reports)
    choices = {(p, sid) for p, sid, _ in previous_choices(runner)}
    done = set()
    for pl in runner.study.pipelines:
        sid = runner.chains[pl.name][-1]
        if selection.is_selection(pl):
            if (pl.name, sid) in choices:
                done.add(pl.name)
        elif (pl.name in prev.rows and prev.rows[pl.name]["eval_stage"] == sid) or sid in prev.others:
            done.add(pl.name)
    return done


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
    # papermill rewrites its output as cells run: into a file of this process's own, renamed into place when
    # done, so a second runner analysing the same study at once never renders half a notebook
    mine, error = work / f"notebook.{os.getpid()}.ipynb", None
    try:
        with stage_environment(progress=False):
            pm.execute_notebook(
                str(ROOT / "notebooks" / ANALYSE), str(mine),
                parameters={"study_dir": str(runner.reports.resolve()), "study": runner.study.name,
                            "description": runner.study.description},
                kernel_name=runner.kernel_name(), progress_bar=False, **kernel_manager_kwargs(cwd=work.resolve()),
            )
    except Exception as e:  # noqa: BLE001
        error = e
    finally:  # a failed run's notebook too (to read it); never a stray file of ours
        if mine.exists():
            os.replace(mine, work / "notebook.ipynb")
    if error is not None:
        log.error("analysis failed: %s (see %s)", short_error(error), work / "notebook.ipynb")
        render_html(work, "index.html", exclude_input=True)
        copy_atomic(work / "index.html", index) if (work / "index.html").exists() else None
        return None
    render_html(work, "index.html", exclude_input=True)
    if not (work / "index.html").exists():  # rendering failed (logged): keep what the reports hold
        return None
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

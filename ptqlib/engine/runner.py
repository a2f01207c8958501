"""The study runner: the content-addressed cache, scheduling, progress.

The stage graph (ids, nodes, chains) is ``ptqlib.study.graph``. ``runs/<id>/`` holds the artifact,
the executed notebook, its HTML page, and ``metrics.json`` — the record, written last and
atomically: a stage is finished iff its record says ``status: ok``. Executing one stage (lock,
papermill, record, page) is ``ptqlib.engine.stage``; where stages run (this process, N worker
processes, SLURM) is ``ptqlib.engine.executors``. The runner knows nothing of reports: the caller
passes a ``reporter`` (``ptqlib.report.tables``), which it calls after a run and on an interruption.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Protocol

from ptqlib.engine.choices import recorded
from ptqlib.engine.executors import Handle, InlineExecutor
from ptqlib.engine.progress import Progress
from ptqlib.engine.record import busy_cpu, version_changes, versions
from ptqlib.engine.stage import (
    BUSY,
    DONE_ELSEWHERE,
    OK,
    finished,
    fresh,
    kernel_name,
    remove_stale_sockets,
    stage_busy,
    stage_environment,
)
from ptqlib.files import RECORD, read_json
from ptqlib.study import selection
from ptqlib.study.graph import build_graph
from ptqlib.study.pipeline import Pipeline, Study

log = logging.getLogger("ptqlib.engine.runner")


class Reporter(Protocol):
    """What the runner asks of a report writer (``ptqlib.report.tables`` is one)."""

    def write_results(self, runner: "Runner", interrupted: bool = False) -> Path | None: ...

    def analyse(self, runner: "Runner", force: bool = False) -> Path | None: ...

    def previous_choices(self, runner: "Runner") -> dict[tuple[str, str, str], float]: ...

    def reported(self, runner: "Runner") -> set[str]: ...


@dataclass
class _Schedule:
    """One run's scheduling state: stage id -> status, and the stages waiting, running and held elsewhere."""

    status: dict[str, str]  # sid -> cached / ok / failed / skipped
    pending: list[str]  # in dependency order
    running: dict[str, Handle] = field(default_factory=dict)  # sid -> executor handle
    errors: dict[str, str] = field(default_factory=dict)  # sid -> why, for failures no record describes
    elsewhere: set[str] = field(default_factory=set)  # stages another runner holds: waited for, then taken if unfinished


def seed_major(pipelines: list[Pipeline]) -> list[Pipeline]:
    """The order stages run in: the selection pipelines first, then every test pipeline of the first seed, then
    of the second, ... (in the study's order within a seed; a seed's place is where it first appears). A run cut
    short then leaves whole seeds, each a paired replicate of every claim, rather than all seeds of the first
    pipelines and none of the last; what each stage computes does not depend on the order."""
    rank: dict[int, int] = {}
    for pl in pipelines:
        if not selection.is_selection(pl):
            rank.setdefault(pl.seed, len(rank))
    return sorted(pipelines, key=lambda pl: -1 if selection.is_selection(pl) else rank[pl.seed])


class Runner:
    def __init__(self, study: Study, runs_dir: str | Path = "runs", reports_dir: str | Path = "reports",
                 kernel: str | None = None, keep_previous: bool = True, reporter: Reporter | None = None):
        self.study = study
        self.reporter = reporter  # None: no results.csv or report after a run (a dry run, a test of the scheduler)
        # pipeline runs not in runs_dir keep their rows from the report already written (same stage ids)
        self.keep_previous = keep_previous
        self.runs = Path(runs_dir)
        self.reports = Path(reports_dir) / study.name
        self.kernel = kernel
        # stages this run has run -> "ok" / "failed": the selection phase's are not run again after it
        self.done: dict[str, str] = {}
        self.analysis_ok = True  # False when the last run's report could not be written (run exits non-zero)
        self.progress: Progress | None = None  # the running phase's progress (which stages run now)
        self.skip: set[str] = set()  # pipelines left out of every plan (leave_reported: the reports hold them)
        self.nodes, self.chains = build_graph(study)
        self.resolve_selections()

    def resolve_selections(self) -> None:
        """Add the test-set pipelines of each select whose validation runs are recorded (ptqlib.study.selection)."""
        if any(s.chosen is None for s in self.study.selections):
            self.study = selection.resolve(self.study, recorded(self))
            self.nodes, self.chains = build_graph(self.study)

    # ----------------------------------------------------------------------------- state
    def record(self, sid: str) -> dict | None:
        return read_json(self.runs / sid / RECORD)

    def finished(self, sid: str) -> bool:
        return finished(self.runs, sid)

    def selected(self, only: list[str] | None) -> list[Pipeline]:
        pls = self.study.pipelines
        if not only:
            return pls
        # a name as it is (grid names hold [...], a pattern to fnmatch); a family also names its selection pipelines
        chosen = [p for p in pls if any(p.name == pat or fnmatch(p.name, pat) or fnmatch(p.family, pat)
                                        or fnmatch(p.family.removesuffix(selection.SUFFIX), pat) for pat in only)]
        if not chosen:
            from ptqlib.errors import ConfigError

            raise ConfigError(f"--only {' '.join(only)}: matches no pipeline; valid: "
                              + ", ".join(sorted({p.family for p in pls})))
        return chosen

    def leave_reported(self) -> list[str]:
        """Leave out of every plan the pipelines whose results the reports already hold (``Reporter.reported``;
        ``ptqlib run --missing``) -> their names. Their rows are kept from the report when it is written."""
        if self.reporter is None or not self.keep_previous:
            from ptqlib.errors import ConfigError

            raise ConfigError("--missing runs what the report already written lacks: it needs that report "
                              "(not --fresh-report)")
        self.skip = self.reporter.reported(self)
        return [p.name for p in self.study.pipelines if p.name in self.skip]

    def plan(self, only: list[str] | None = None) -> list[str]:
        """Stage ids needed by the selected pipelines (less those in ``skip``), in dependency order, seed by seed
        (``seed_major``)."""
        want: list[str] = []
        for pl in seed_major(self.selected(only)):
            if pl.name in self.skip:
                continue
            for sid in self.chains[pl.name]:
                if sid not in want:
                    want.append(sid)
        return want

    def to_run(self, plan: list[str], force: bool = False) -> list[str]:
        """Stages of ``plan`` that must run: forced, unfinished, or with an input that runs
        (a finished record describes an output made from the old input)."""
        todo: list[str] = []
        for sid in plan:
            if sid in self.done:  # run already in this run (by the selection phase): ok, or failed for good
                continue
            inp = self.nodes[sid].input_id
            if force or not self.finished(sid) or inp in todo or inp in self.done:
                todo.append(sid)
        return todo

    def version_drift(self, cached: list[str]) -> str:
        """A warning when ``cached`` stages' records name other versions of the numeric packages
        (``record.NUMERIC_PACKAGES``) than this environment has, else ``''``. A stage id hashes
        parameters, not versions: a fresh install with a newer transformers reuses the old records,
        so a report can mix numbers from two versions, which a rerun here would not reproduce."""
        now = versions()
        changed: dict[tuple[str, str, str], int] = {}  # (package, recorded, current) -> cached stages
        for sid in cached:
            for pkg, (old, new) in version_changes((self.record(sid) or {}).get("versions"), now).items():
                changed[(pkg, old, new)] = changed.get((pkg, old, new), 0) + 1
        if not changed:
            return ""
        what = "; ".join(f"{pkg} {old} in {n} (here {new})" for (pkg, old, new), n in sorted(changed.items()))
        return (f"cached stages ran under other package versions than this environment's: {what}; their "
                "numbers stand as recorded (a stage id does not hash versions), so the report may mix versions: "
                "install the recorded ones (constraints.txt) or re-run with --force")

    def describe(self, only: list[str] | None = None, force: bool = False) -> str:
        lines = [f"study {self.study.name!r} ({self.study.path}): {len(self.selected(only))} pipelines"]
        plan = self.plan(only)
        todo = set(self.to_run(plan, force))
        for pl in self.selected(only):
            if pl.name in self.skip:
                lines.append(f"  {pl.name}: in the report already (--missing leaves it out)")
                continue
            parts = []
            for sid in self.chains[pl.name]:
                parts.append(f"{self.nodes[sid].label()} [{sid} {'to run' if sid in todo else 'cached'}]")
            lines.append(f"  {pl.name}: " + " -> ".join(parts))
        lines += selection.describe(self.study, only)
        cached = len(plan) - len(todo)
        lines.append(f"{len(plan)} distinct stages: {cached} cached, {len(plan) - cached} to run"
                     + (" (then the stages of the test-set pipelines that wait for a selection)"
                        if selection.waiting(self.study, only) else ""))
        return "\n".join(lines)

    # ----------------------------------------------------------------------------- running
    def run(self, only: list[str] | None = None, force: bool = False, progress: bool = False,
            executor=None) -> int:
        """Run what is missing; returns the number of failed stages.

        ``executor`` (``ptqlib.engine.executors``; default: one stage at a time in this process) runs
        each stage once its input is finished. Several runners may work on one runs directory:
        a stage runs under its own lock, and a stage another runner is running is waited for.
        """
        remove_stale_sockets()  # those a killed runner left in the temp directory
        from ptqlib.engine import kernels

        self.runs.mkdir(parents=True, exist_ok=True)
        self.done = {}
        executor = executor or InlineExecutor(self.runs, self.kernel, progress)
        # stage kernels fork from one pre-loaded process (local runs; a cluster job has its own)
        with stage_environment(progress):  # the zygote's imports see the stages' environment
            zygote = kernels.start() if getattr(executor, "local", True) and self.to_run(self.plan(only), force) else None
            try:
                return self._run(only, force, executor)
            finally:
                executor.close()
                if zygote is not None:
                    zygote.close()

    def _run(self, only, force, executor) -> int:
        """The selection pipelines whose choice is not known yet (their results decide the stages of
        their family's test-set pipelines), then everything ``only`` asks for."""
        first = selection.waiting(self.study, only)
        if first:
            log.info("selection on the validation split first: %s", ", ".join(first))
            self._run_stages(first, force, executor, report=False)
            self.resolve_selections()
            for sel in self.study.selections:
                if sel.chosen is None and selection.matches(sel, only):
                    log.error("%s: no %s chosen (a selection pipeline did not finish): its test-set pipelines "
                              "do not run", sel.where(), sel.key)
        self._run_stages(only, force, executor)
        return sum(v == "failed" for v in self.done.values())

    def _run_stages(self, only, force, executor, report: bool = True) -> int:
        plan = self.plan(only)
        t_all = time.time()
        todo = self.to_run(plan, force)
        log.info("study %s: %d stages, %d cached, %d to run%s", self.study.name, len(plan), len(plan) - len(todo),
                 len(todo), f" ({executor.slots} at a time)" if executor.slots > 1 else "")
        if drift := self.version_drift([s for s in plan if s not in todo and s not in self.done]):
            log.warning(drift)
        if todo and not self.done and (busy := busy_cpu()):  # after stages of this run, their own load would count
            log.warning(busy)
        self.progress = Progress(self, todo, executor.slots)
        sched = _Schedule(status={sid: self.done.get(sid, "cached") for sid in plan}, pending=list(todo))
        while sched.pending or sched.running or sched.elsewhere:
            self._start_ready(sched, executor, force)
            self._collect_finished(sched)
            self._reclaim_elsewhere(sched)
            if sched.running or sched.elsewhere:
                time.sleep(0.2)
        self.progress.close()
        if report and self.reporter is not None:
            self.reporter.write_results(self)
            # also with failures: the report shows what finished and marks the rest
            self.analysis_ok = self.reporter.analyse(self) is not None
        return self._summarise(sched, time.time() - t_all)

    def _start_ready(self, sched: "_Schedule", executor, force: bool) -> None:
        """Submit each pending stage whose input is done, while the executor has a free slot; skip those
        whose input failed; leave to another runner those it holds."""
        for sid in list(sched.pending):
            node = self.nodes[sid]
            if node.input_id and sched.status.get(node.input_id) in ("failed", "skipped"):
                sched.pending.remove(sid)
                sched.status[sid] = "skipped"
                self.progress.skip(sid)
                log.info("skip %s %s: its input %s did not finish", sid, node.label(), node.input_id)
                continue
            blocked = node.input_id in sched.running or node.input_id in sched.elsewhere or node.input_id in sched.pending
            if blocked or len(sched.running) >= executor.slots:
                continue
            sched.pending.remove(sid)
            if stage_busy(self.runs, sid):
                sched.elsewhere.add(sid)
                log.info("   %s %s is running in another runner: waiting for it", sid, node.label())
                continue
            self.progress.start(sid)
            sched.running[sid] = executor.submit(node, force)  # one job in this process: already done

    def _collect_finished(self, sched: "_Schedule") -> None:
        """Record the stages whose handles have finished (one another runner took in between: waited for)."""
        for sid, handle in list(sched.running.items()):
            res = handle.poll()
            if res is None:
                continue
            del sched.running[sid]
            if res == BUSY:  # another runner took it between our check and the start
                self.progress.skip(sid, restart=True)
                sched.elsewhere.add(sid)
                continue
            sched.status[sid] = self.done[sid] = "ok" if res in (OK, DONE_ELSEWHERE) else "failed"
            if handle.error:
                sched.errors[sid] = handle.error
            self.progress.done(sid, sched.status[sid] == "ok", by_other=res == DONE_ELSEWHERE)

    def _reclaim_elsewhere(self, sched: "_Schedule") -> None:
        """A stage another runner held: done if it finished it (from the current input), else run here."""
        for sid in list(sched.elsewhere):
            if stage_busy(self.runs, sid):
                continue
            sched.elsewhere.discard(sid)
            if fresh(self.runs, self.nodes[sid]):
                sched.status[sid] = "ok"
                self.progress.done(sid, True, by_other=True)
            else:  # the other runner died or failed it
                sched.pending.insert(0, sid)

    def _summarise(self, sched: "_Schedule", seconds: float) -> int:
        """Log what ran and why each failure failed -> the number of failed stages."""
        failed = [s for s, v in sched.status.items() if v == "failed"]
        skipped = [s for s, v in sched.status.items() if v == "skipped"]
        log.info("done in %.0f s: %d ran, %d cached, %d failed, %d skipped", seconds,
                 sum(v == "ok" for v in sched.status.values()), sum(v == "cached" for v in sched.status.values()),
                 len(failed), len(skipped))
        for sid in failed:
            rec = self.record(sid) or {}
            why = ((rec.get("error") or {}).get("message") or sched.errors.get(sid)
                   or "no record written (see the log above)")
            log.error("FAILED %s %s (pipelines %s): %s", sid, self.nodes[sid].label(),
                      ", ".join(self.nodes[sid].pipelines), why)
        if failed:
            log.error("see runs/<id>/notebook.ipynb and report.html of the failed stages")
        return len(failed)

    def interrupted(self) -> str:
        """After Ctrl-C / SIGTERM: say which stages were cut short and what finished, and write
        results.csv / units.csv for the finished pipelines (``ptqlib analyse`` renders the report), unless
        that would replace a complete report with an incomplete one."""
        running = list(self.progress.started) if self.progress else []
        done = sum(v == "ok" for v in self.done.values())
        if self.reporter is None:
            written = "results.csv not written (no reporter)"
        else:
            try:
                self.resolve_selections()  # a select whose candidates all finished: its choice and test rows shown
                if self.reporter.write_results(self, interrupted=True) is None:
                    written = (f"{self.reports} left as it was (a complete report of an earlier run, which this "
                               "run's incomplete rows would replace); the next run reports the finished stages")
                else:
                    written = (f"{self.reports / 'results.csv'} holds what finished; python -m ptqlib analyse "
                               "renders the report")
            except Exception as e:  # noqa: BLE001 — interrupted anyway: say so, do not hide the interruption
                written = f"results.csv not written ({e})"
        cut = ", ".join(f"{sid} {self.nodes[sid].label()}" for sid in running) or "none"
        return (f"interrupted: stages cut short (they run again next time): {cut}; {done} stages finished in this "
                f"run; {written}")

    def kernel_name(self) -> str:
        return kernel_name(self.kernel)

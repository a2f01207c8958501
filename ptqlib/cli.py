"""Run a study of quantized fine-tuning: python -m ptqlib run parameters/<study>.yaml

Every pipeline of the study file runs through the stage notebooks (quantize, finetune, evaluate);
finished stages are cached under runs/, and the report is written to reports/<study>/index.html.
The other commands: analyse (re-render a report), plan (the seeds each claim needs), export (a stage's
model as GGUF), methods (the registered methods), notebooks (the stage notebooks' parameters cells
from the parameter dataclasses), findings (the README's findings from reports/*/claims.csv).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ptqlib.deploy.types import TYPES as GGUF_TYPES
from ptqlib.engine.executors import EXECUTORS
from ptqlib.errors import ConfigError


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m ptqlib", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="{run,analyse,plan,export,methods,notebooks,findings}")
    _study_parsers(sub)
    _tool_parsers(sub)
    return ap


def _study_parsers(sub) -> None:
    """run, analyse, plan: the commands that read a study file."""
    run = sub.add_parser("run", help="run (or --dry-run) a study: the stages not cached yet, then the report",
                         description="Run the stages of a study that are not cached yet, then render its report.")
    run.add_argument("study", help="the study file, e.g. parameters/default.yaml")
    run.add_argument("--dry-run", action="store_true",
                     help="validate, print the stage graph and what is cached; run nothing and use no network")
    run.add_argument("--force", action="store_true", help="re-run the selected stages even if cached")
    run.add_argument("--only", nargs="+", metavar="PIPELINE",
                     help="run only these pipelines (names or globs, e.g. 'ft_*' or 'base')")
    run.add_argument("--missing", action="store_true",
                     help="run only the pipelines whose results the reports lack (a row, or a selection value, of "
                          "the same stage ids): a long study goes on from its committed partial report on a fresh "
                          "clone, whose stage cache is empty")
    run.add_argument("--runs", default="runs", help="stage cache directory (default: runs)")
    run.add_argument("--reports", default="reports", help="reports directory (default: reports)")
    run.add_argument("--kernel", default=None, help="Jupyter kernel name (default: 'ptqlib' if registered, else python3)")
    run.add_argument("--progress", action="store_true", help="show tqdm bars inside the notebooks (in the stage pages)")
    run.add_argument("--jobs", type=int, default=None, metavar="N",
                     help="stages running at once, each in its own process, dependency order kept; CPU threads are "
                          "split between them (default: 1, or one per --gpus device; slurm: every ready stage)")
    run.add_argument("--threads", type=int, default=None, metavar="T",
                     help="torch threads per local job (default: CPU cores // --jobs); the count moves the last "
                          "bits of the results, so give a serial run's count to reproduce its records exactly")
    run.add_argument("--gpus", default=None, metavar="0,1,...",
                     help="GPU ids for local jobs: each running stage gets one (CUDA_VISIBLE_DEVICES)")
    run.add_argument("--executor", default=None, choices=EXECUTORS,
                     help="where stages run: local processes (default), SLURM jobs via submitit (resources from the "
                          "study's executor: section), or submitit's local executor (the same code path without SLURM)")
    run.add_argument("--executor-opt", action="append", metavar="KEY=VALUE",
                     help="override a key of the study's executor: section, e.g. partition=gpu time_min=240 (repeatable)")
    ana = sub.add_parser("analyse", help="re-render reports/<study>/ from the finished stages (runs nothing)",
                         description="Re-render reports/<study>/ (results, units, claims, index.html) from the "
                                     "finished stages in the runs directory; no stage is run.")
    ana.add_argument("study", help="the study file, e.g. parameters/default.yaml")
    ana.add_argument("--runs", default="runs", help="stage cache directory to read (default: runs)")
    ana.add_argument("--reports", default="reports", help="reports directory to write (default: reports)")
    for sp in (run, ana):
        sp.add_argument("--fresh-report", action="store_true",
                        help="write the report from the stage cache alone; by default a pipeline run whose "
                             "stages are not in the cache keeps its row from the report already there "
                             "when its stage ids are unchanged, or from another study's report with "
                             "its evaluate stage id")
    pln = sub.add_parser("plan", help="per claim: variance components, the seeds that would decide it, their CPU time",
                         description="From a study's recorded units (reports/<study>/units.csv, results.csv): per "
                                     "claim the seed, example and interaction variance components, the seeds at "
                                     "which its interval would decide it if the difference stayed at its estimate, "
                                     "and the CPU time of those seeds from the recorded stage times; writes "
                                     "reports/<study>/plan.csv. Runs no stage.")
    pln.add_argument("study", help="the study file, e.g. parameters/default.yaml")
    pln.add_argument("--reports", default="reports", help="reports directory to read (default: reports)")


def _tool_parsers(sub) -> None:
    """export, methods, notebooks, findings: the commands that need no study file."""
    exp = sub.add_parser("export", help="write a stage's model as a GGUF file that llama.cpp runs",
                         description="Export a model (a run directory of a quantize / finetune stage, or a model "
                                     "name) to GGUF. Quantized layers keep their codes exactly where GGUF can "
                                     "hold them (Q4_1 for <= 4 bits with groups of 32k, Q8_0 for symmetric "
                                     "8 bits); anything else is refused unless --lossy.")
    exp.add_argument("model", help="a run directory (runs/<id>) or a model name")
    exp.add_argument("--format", default="gguf", choices=["gguf"], help="output format (default: gguf)")
    exp.add_argument("--type", default="auto", choices=GGUF_TYPES,
                     help="weight type: auto keeps the codes (Q4_1 / Q8_0; float layers F16; a K-quant stage's own "
                          "llama.cpp file as it is); default: auto")
    exp.add_argument("--lossy", action="store_true",
                     help="re-quantize layers the type cannot hold exactly (NF4, act-order, groups not a multiple of 32)")
    exp.add_argument("-o", "--output", required=True, help="the .gguf file to write")
    sub.add_parser("methods", help="list the registered quantization and fine-tuning methods",
                   description="The methods a study file can name (ptqlib.methods, plus modules named in "
                               "PTQLIB_METHODS): what each needs as input, gives the next stage, and its settings.")
    nbs = sub.add_parser("notebooks", help="write the stage notebooks' parameters cells from the parameter dataclasses",
                         description="Each setting is defined once, in ptqlib/study/params.py (name, type, default, "
                                     "help comment); this writes the tagged parameters cell of each stage notebook "
                                     "from it (ptqlib.study.cells).")
    nbs.add_argument("--check", action="store_true", help="write nothing; exit 1 naming the notebooks that differ")
    nbs.add_argument("--dir", default="notebooks", help="the notebooks directory (default: notebooks)")
    fin = sub.add_parser("findings", help="write the README's findings table from reports/*/claims.csv",
                         description="Rewrite the text between <!-- findings:begin --> and <!-- findings:end --> "
                                     "in the README: per study, the claims tested, holding, and holding after "
                                     "Holm, with the differences and intervals of those that hold after Holm.")
    fin.add_argument("--check", action="store_true",
                     help="write nothing; exit 1 with a diff when the README's table is not what would be written")
    fin.add_argument("--readme", default="README.md", help="the file with the markers (default: README.md)")
    fin.add_argument("--reports", default="reports", help="reports directory to read (default: reports)")


def _unwritable(d: Path) -> str | None:
    """Why files cannot be written under ``d`` (None: they can): made if missing, probed with a temp file."""
    import tempfile

    try:
        d.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=d, prefix=".ptqlib-probe-"):
            pass
    except OSError as e:
        return f"not writable ({e.strerror or e})"
    return None


class Terminated(BaseException):
    """SIGTERM received while a study runs.

    A ``BaseException``, as ``KeyboardInterrupt`` is: with one job the stage runs in this thread, and
    the stage's own ``except Exception`` (a failed stage is recorded, the study goes on) would
    otherwise take the signal for a failure of that stage and start the next one."""


def methods_table() -> str:
    """The registry as text: one line per method (``python -m ptqlib methods``)."""
    import dataclasses

    from ptqlib.methods import finetune_methods, quantize_methods

    def own(m) -> list[str]:  # the method's own settings (ptqlib.methods.Options), with their defaults
        if m.options is None:
            return []
        return [f"  {'':<9} own settings: " + ", ".join(
            f"{f.name}={f.default if f.default is not dataclasses.MISSING else f.default_factory()!r}"
            for f in dataclasses.fields(m.options))]

    lines = ["quantize:"]
    for m in quantize_methods().values():
        lines.append(f"  {m.name:<9} {m.grid:<8} bits {','.join(map(str, m.bits)):<8} {m.summary}")
        lines += own(m)
        lines += [f"  {'':<9} formats: {m.variants}"] if m.variants else []
    lines.append("finetune:")
    for m in finetune_methods().values():
        lines.append(f"  {m.name:<9} {m.needs:>9} -> {m.gives:<9} {m.summary}")
        lines += own(m)
    return "\n".join(lines)


def _export(args) -> int:
    import json

    from ptqlib import artifacts
    from ptqlib.deploy import ExportError, export_gguf
    from ptqlib.errors import ArtifactError, ConfigError

    try:
        model, tok, info = artifacts.load(args.model, device="cpu")
    except (ArtifactError, ConfigError, OSError, ValueError, KeyError) as e:
        print(f"error: export {args.model!r}: cannot load a model from it ({e}); give a quantize or finetune "
              "stage's run directory (runs/<id>) or a model name", file=sys.stderr)
        return 2
    own = artifacts.own_gguf(args.model) if Path(args.model).is_dir() else None
    try:
        if own is not None and args.type == "auto":  # the stage *is* llama.cpp's file (a K-quant): auto keeps it
            from ptqlib.deploy.kquants import copy_file

            report = copy_file(own, args.output)
        else:
            report = export_gguf(model, tok, args.output, type=args.type, lossy=args.lossy)
    except (ExportError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report.summary(), indent=1))
    return 0


def _findings(args) -> int:
    from ptqlib.report.findings import update

    try:
        same, diff = update(args.readme, args.reports, check=args.check)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if same:
        print(f"{args.readme}: findings up to date")
        return 0
    if args.check:
        print(diff, end="")
        print(f"{args.readme}: findings differ from {args.reports}/*/claims.csv; run python -m ptqlib findings",
              file=sys.stderr)
        return 1
    print(f"{args.readme}: findings written")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.cmd == "findings":  # reads CSVs only: no study file, no torch
        return _findings(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    logging.getLogger("papermill").setLevel(logging.WARNING)  # one line per stage from the runner is enough
    if args.cmd in ("export", "methods", "notebooks"):
        return {"export": _export, "methods": _methods, "notebooks": _notebooks}[args.cmd](args)
    from ptqlib.study.schema import load_study

    try:
        study = load_study(args.study, allow_network=not (args.cmd == "run" and args.dry_run))
        return {"plan": _plan, "analyse": _analyse, "run": _run}[args.cmd](args, study)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full or read-only reports disk while the report is written
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}: the report could not be written. The stage records under "
              f"{getattr(args, 'runs', 'runs')} are kept and no report file was left half-written; free space (or "
              "give --reports another directory) and run the command again: finished stages do not run again",
              file=sys.stderr)
        return 1


def _methods(args) -> int:
    print(methods_table())
    return 0


def _notebooks(args) -> int:
    from ptqlib.study.cells import sync

    changed = sync(args.dir, check=args.check)
    for path in changed:
        print(f"{path}: parameters cell {'differs from' if args.check else 'rewritten from'} ptqlib/study/params.py",
              file=sys.stderr if args.check else sys.stdout)
    if args.check and changed:
        print("run: python -m ptqlib notebooks", file=sys.stderr)
    return 1 if args.check and changed else 0


def _plan(args, study) -> int:
    from ptqlib.report import tables
    from ptqlib.report.plan import describe, plan_study

    try:
        table = plan_study(study, args.reports, tables)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{study.name}: {len(table)} claims (reports/{study.name}/plan.csv)")
    print(describe(table))
    return 0


def _auto_elsewhere(study, runner, refuse: bool = True) -> str:
    """Why the report already written loses rows that only ``precision: auto`` makes stale
    (``report.previous.auto_elsewhere``): an error's text (``refuse``: nothing is rewritten) or a warning's, or ''."""
    from ptqlib import precision
    from ptqlib.report.previous import auto_elsewhere

    if not runner.keep_previous or not (found := auto_elsewhere(study, runner)):
        return ""
    (other, n), here = found, precision.resolve("auto")
    why = (f"{runner.reports}: {n} of its rows were computed with precision auto = {other} (results.csv's machines "
           f"column names the CPU); this machine resolves auto to {here}, so their stage ids differ")
    render = f"{precision.AUTO_ENV}={other} python -m ptqlib analyse {study.path}"
    if refuse:
        return (f"{why} and rewriting the report would drop them: nothing was rewritten. To render it here (nothing "
                f"runs): {render}; to continue it, run on a machine where auto is {other}, or pin a precision in "
                "the study file and re-run it")
    return (f"{why}: this run computes those pipelines again at {here}, and its report replaces theirs (pin a "
            f"precision in the study file for one set of ids on every machine; {render} renders the committed one)")


def _analyse(args, study) -> int:
    from ptqlib.engine.runner import Runner
    from ptqlib.report import tables

    r = Runner(study, args.runs, args.reports, keep_previous=not args.fresh_report, reporter=tables)
    if why := _auto_elsewhere(study, r):
        print(f"error: {why}", file=sys.stderr)
        return 2
    tables.write_results(r)
    return 0 if tables.analyse(r, force=True) else 1


def _run(args, study) -> int:
    """run (or --dry-run): the stages not cached yet, then the report; exit 130 / 143 when interrupted."""
    from ptqlib.engine.runner import Runner
    from ptqlib.report import tables

    runner = Runner(study, args.runs, args.reports, kernel=args.kernel, keep_previous=not args.fresh_report,
                    reporter=tables)
    if args.missing:
        if why := _auto_elsewhere(study, runner):
            print(f"error: {why}", file=sys.stderr)
            return 2
        left = runner.leave_reported()
        print(f"--missing: {len(left)} pipelines are in the reports already and do not run", file=sys.stderr)
    elif why := _auto_elsewhere(study, runner, refuse=False):
        print(f"warning: {why}", file=sys.stderr)
    if args.dry_run:
        print(runner.describe(args.only, args.force))
        for note in study.notes:
            print(f"note: {note}")
        return 0
    for d in (Path(args.runs), Path(args.reports)):  # before any stage: a result must have a place to go
        problem = _unwritable(d)
        if problem:
            print(f"error: {d}: {problem}; no stage ran (choose another directory with --runs / --reports)",
                  file=sys.stderr)
            return 2
    executor = _make_executor(args, study, runner)
    if executor is None:
        return 2
    import signal

    def _terminate(signum, frame):  # SIGTERM (a scheduler, kill): stop as Ctrl-C does, and say so
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        failed = runner.run(args.only, args.force, args.progress, executor=executor)
    except (KeyboardInterrupt, Terminated) as e:
        print(runner.interrupted(), file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"reports: {runner.reports / 'index.html'}  table: {runner.reports / 'results.csv'}")
    if not runner.analysis_ok:
        print("error: the analysis failed (see the log above): the report is not up to date", file=sys.stderr)
    return 1 if failed or not runner.analysis_ok else 0


def _make_executor(args, study, runner):
    """Where the stages run (--executor, --jobs, --gpus, the study's executor: section with --executor-opt
    over it); None after printing why it cannot be made."""
    from ptqlib.engine.executors import make_executor

    gpus = [g.strip() for g in args.gpus.split(",") if g.strip()] if args.gpus else None
    section = dict(study.executor)
    for opt in args.executor_opt or []:  # flags override the study file's executor: section
        key, sep, value = opt.partition("=")
        if not sep:
            print(f"error: --executor-opt {opt!r}: expected KEY=VALUE", file=sys.stderr)
            return None
        section[key] = int(value) if value.isdigit() else value
    try:
        return make_executor(args.executor or "local", runner.runs, args.jobs, gpus, args.kernel, args.progress,
                             section, args.threads)
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return None

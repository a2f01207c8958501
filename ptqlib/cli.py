"""Run a study of quantized fine-tuning: python -m ptqlib run parameters/<study>.yaml

Every pipeline of the study file runs through the stage notebooks (quantize, finetune, evaluate);
finished stages are cached under runs/, and the report is written to reports/<study>/index.html.
"""
from __future__ import annotations

import argparse
import logging
import sys

from ptqlib.errors import ConfigError


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m ptqlib", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="{run,analyse}")
    run = sub.add_parser("run", help="run (or --dry-run) a study: the stages not cached yet, then the report",
                         description="Run the stages of a study that are not cached yet, then render its report.")
    run.add_argument("study", help="the study file, e.g. parameters/default.yaml")
    run.add_argument("--dry-run", action="store_true",
                     help="validate, print the stage graph and what is cached; run nothing and use no network")
    run.add_argument("--force", action="store_true", help="re-run the selected stages even if cached")
    run.add_argument("--only", nargs="+", metavar="PIPELINE",
                     help="run only these pipelines (names or globs, e.g. 'ft_*' or 'base')")
    run.add_argument("--runs", default="runs", help="stage cache directory (default: runs)")
    run.add_argument("--reports", default="reports", help="reports directory (default: reports)")
    run.add_argument("--kernel", default=None, help="Jupyter kernel name (default: 'ptqlib' if registered, else python3)")
    run.add_argument("--progress", action="store_true", help="show tqdm bars inside the notebooks (in the stage pages)")
    ana = sub.add_parser("analyse", help="re-render reports/<study>/ from the finished stages (runs nothing)",
                         description="Re-render reports/<study>/ (results, units, claims, index.html) from the "
                                     "finished stages in the runs directory; no stage is run.")
    ana.add_argument("study", help="the study file, e.g. parameters/default.yaml")
    ana.add_argument("--runs", default="runs", help="stage cache directory to read (default: runs)")
    ana.add_argument("--reports", default="reports", help="reports directory to write (default: reports)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    logging.getLogger("papermill").setLevel(logging.WARNING)  # one line per stage from the runner is enough

    from ptqlib.config import load_study
    from ptqlib.runner import Runner

    try:
        study = load_study(args.study, allow_network=not (args.cmd == "run" and args.dry_run))
        if args.cmd == "analyse":
            r = Runner(study, args.runs, args.reports)
            r.write_results()
            return 0 if r.analyse(force=True) else 1
        runner = Runner(study, args.runs, args.reports, kernel=args.kernel)
        if args.dry_run:
            print(runner.describe(args.only, args.force))
            for note in study.notes:
                print(f"note: {note}")
            return 0
        failed = runner.run(args.only, args.force, args.progress)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"reports: {runner.reports / 'index.html'}  table: {runner.reports / 'results.csv'}")
    return 1 if failed else 0

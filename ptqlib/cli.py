"""``python -m ptqlib run parameters/<study>.yaml [--dry-run] [--force] [--only NAME ...]``."""
from __future__ import annotations

import argparse
import logging
import sys

from ptqlib.errors import ConfigError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ptqlib", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="run (or --dry-run) a study")
    run.add_argument("study", help="parameters/<study>.yaml")
    run.add_argument("--dry-run", action="store_true", help="validate, print the stage graph and what is cached; run nothing")
    run.add_argument("--force", action="store_true", help="re-run the selected stages even if cached")
    run.add_argument("--only", nargs="+", metavar="PIPELINE",
                     help="run only these pipelines (names or globs, e.g. 'ft_*' or 'base')")
    run.add_argument("--runs", default="runs", help="stage cache directory (default: runs)")
    run.add_argument("--reports", default="reports", help="reports directory (default: reports)")
    run.add_argument("--kernel", default=None, help="Jupyter kernel name (default: 'ptqlib' if registered)")
    run.add_argument("--progress", action="store_true", help="tqdm bars inside the notebooks")
    ana = sub.add_parser("analyse", help="re-render reports/<study>/ from the finished stages")
    ana.add_argument("study")
    ana.add_argument("--runs", default="runs")
    ana.add_argument("--reports", default="reports")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    logging.getLogger("papermill").setLevel(logging.WARNING)  # one line per stage from the runner is enough

    from ptqlib.config import load_study
    from ptqlib.runner import Runner

    try:
        study = load_study(args.study)
        if args.cmd == "analyse":
            r = Runner(study, args.runs, args.reports)
            r.write_results()
            return 0 if r.analyse(force=True) else 1
        runner = Runner(study, args.runs, args.reports, kernel=args.kernel)
        if args.dry_run:
            print(runner.describe(args.only, args.force))
            return 0
        failed = runner.run(args.only, args.force, args.progress)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"reports: {runner.reports / 'index.html'}  table: {runner.reports / 'results.csv'}")
    return 1 if failed else 0

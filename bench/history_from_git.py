"""Backfill ``reports/<study>/history.csv`` from the git history of its ``claims.csv``.

    python bench/history_from_git.py [STUDY ...]     # default: every study with a claims.csv

``history.csv`` (``ptqlib.report.analysis.append_history``) is written by each analysis from 2026-12-04
on. The verdicts of the runs before it are in git: every commit that changed a study's ``claims.csv``
is one analysed run. This writes one row per claim per such commit (its date, commit, the seeds of
``results.csv`` at that commit; machines were not recorded then), oldest first, ahead of the rows the
analyses wrote, and leaves a study whose history already starts with backfilled rows alone.
"""
from __future__ import annotations

import argparse
import io
import subprocess
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ptqlib.files import write_atomic  # noqa: E402
from ptqlib.report.analysis import HISTORY_COLUMNS  # noqa: E402

NOT_RECORDED = "not recorded"


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout


def backfill(study: str) -> int:
    rel = f"reports/{study}/claims.csv"
    commits = _git("log", "--format=%H %cI", "--reverse", "--", rel).split("\n")
    rows = []
    for line in filter(None, commits):
        sha, date = line.split(" ", 1)
        try:
            claims = pd.read_csv(io.StringIO(_git("show", f"{sha}:{rel}")), keep_default_na=False)
        except subprocess.CalledProcessError:  # deleted in this commit
            continue
        try:
            results = pd.read_csv(io.StringIO(_git("show", f"{sha}:reports/{study}/results.csv")))
            seeds = " ".join(str(s) for s in sorted(set(pd.to_numeric(results["seed"], errors="coerce").dropna().astype(int))))
        except (subprocess.CalledProcessError, KeyError):
            seeds = ""
        for r in claims.to_dict("records"):
            rows.append({"date": date, "commit": sha, "machines": NOT_RECORDED, "seeds": seeds,
                         **{k: r.get(k, "") for k in HISTORY_COLUMNS[4:]}})
    path = ROOT / "reports" / study / "history.csv"
    old = pd.read_csv(path, keep_default_na=False, dtype=str) if path.exists() else pd.DataFrame(columns=HISTORY_COLUMNS)
    if (old["machines"] == NOT_RECORDED).any():
        print(f"{study}: history.csv already backfilled")
        return 0
    table = pd.concat([pd.DataFrame(rows, columns=HISTORY_COLUMNS), old], ignore_index=True)
    write_atomic(path, table.to_csv(index=False))
    print(f"{study}: {len(rows)} rows from {len(set(r['commit'] for r in rows))} commits, then {len(old)} recorded")
    return len(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("studies", nargs="*", help="study names (default: every reports/<study>/claims.csv)")
    args = ap.parse_args()
    for study in args.studies or sorted(p.parent.name for p in (ROOT / "reports").glob("*/claims.csv")):
        backfill(study)


if __name__ == "__main__":
    main()

"""The README's findings table, generated from the committed ``reports/<study>/claims.csv`` files.

``python -m ptqlib findings`` rewrites the text between the two marker comments of README.md;
``--check`` only compares (CI and tests/report/test_findings.py), so a finding is never copied by hand.
Per study a line: how many claims there are, how many were tested (enough paired seeds and an
interval), how many hold, how many hold and how many do not hold after Holm's correction over the
study's claims (the study is the Holm family: every tested claim of it, both directions); a study over
several models or tasks decides each claim per cell and says, per claim, in how many cells it holds; then one
table of the claims decided after Holm, with their family, difference and 95% interval
(docs/statistics.md). A claim flagged at the floor or ceiling of its metric (one side learned nothing,
or both are at 1.000) says little and is left out of the table; the study's own README lists it. A report whose
run is not finished (rows of ``results.csv`` not ok) gives a line saying how far it got and no verdicts.
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path

import pandas as pd

from ptqlib.files import write_atomic
from ptqlib.report.cells import cell_counts, counts_text, labelled

BEGIN, END = "<!-- findings:begin -->", "<!-- findings:end -->"
NEEDED = ("claim", "tested", "metric", "difference", "ci_low", "ci_high", "verdict", "p_holds", "p_fails",
          "p_holm", "verdict_holm", "flags")


def _claims(path: Path) -> pd.DataFrame:
    try:
        table = pd.read_csv(path, keep_default_na=False, na_values=[""])
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable CSV file ({e})") from None
    missing = [c for c in NEEDED if c not in table]
    if missing:
        raise ValueError(f"{path}: no column {missing} (written before two-sided Holm and the flags); re-decide it with "
                         f"python -m ptqlib analyse parameters/<study>.yaml or ptqlib.report.analysis.redecide")
    return table


def _num(v: float) -> str:
    return f"{v:+.3f}" if abs(v) < 100 else f"{v:+.1f}"


def _flagged(table: pd.DataFrame) -> pd.Series:
    return table["flags"].fillna("").astype(str).str.len() > 0


def counts_line(name: str, table: pd.DataFrame, link: str) -> str:
    """``- **study** (report): n claims; k tested (...); h hold; j hold and l do not hold after Holm.``"""
    n, tested = len(table), int(table["p_holds"].notna().sum())
    seeds = int(table["verdict"].str.startswith("undecided (needs >=").sum())
    why = [f"{seeds} need >= 3 paired seeds"] if seeds else []
    why += [f"{n - tested - seeds} without data or interval"] if n - tested - seeds else []
    decided = table["verdict_holm"].isin(["holds", "does not hold"])
    flagged = int((decided & _flagged(table)).sum())
    explore = int(table["verdict_holm"].astype(str).str.endswith("(exploratory: outside Holm)").sum())
    return (f"- **{name}** ([report]({link})): {_claims_text(table)}"
            + (f" ({explore} exploratory, outside Holm)" if explore else "") + f"; {tested} tested"
            + (f" ({', '.join(why)})" if why else "") + f"; {int((table['verdict'] == 'holds').sum())} hold; "
            f"after Holm {int((table['verdict_holm'] == 'holds').sum())} hold, "
            f"{int((table['verdict_holm'] == 'does not hold').sum())} do not"
            + (f" ({flagged} at a floor or ceiling, left out below)" if flagged else "") + ".")


def _claims_text(table: pd.DataFrame) -> str:
    """``n claims``; in a model x task sweep (a ``cell`` column) ``k claims x c cells = n tests``, since every
    row of the table is one claim decided in one cell and the counts after it are of those rows."""
    n = len(table)
    cells = table["cell"].fillna("").astype(str).nunique() if "cell" in table else 1
    if cells > 1:
        k = table["claim"].nunique()
        return f"{k} claim{'s' if k != 1 else ''} x {cells} cells = {n} tests"
    return f"{n} claim{'s' if n != 1 else ''}"


def run_line(study_dir: Path) -> str:
    """`` Analysed <date> (<machines>; seeds ...), declared final.``: which analysed run the verdicts are (the
    last of ``history.csv``) and whether the study file declares it the final one (``final: true``)."""
    import json

    hist = study_dir / "history.csv"
    if not hist.exists():
        return ""
    try:
        h = pd.read_csv(hist, keep_default_na=False, dtype=str)
        last = h.iloc[-1]  # a row of the last analysed run
        final = bool(json.loads((study_dir / "study.json").read_text()).get("final", False)) \
            if (study_dir / "study.json").exists() else False
    except (pd.errors.ParserError, pd.errors.EmptyDataError, KeyError, IndexError, ValueError) as e:
        raise ValueError(f"{hist}: not a history as ptqlib writes it ({type(e).__name__}: {e})") from None
    seeds = last["seeds"].split()
    seed_text = f"seeds {seeds[0]}-{seeds[-1]}" if len(seeds) > 2 else f"seeds {' '.join(seeds)}" if seeds else "no seeds"
    return (f" Analysed {last['date'][:10]} (machines: {last['machines']}; {seed_text})"
            + (", declared final in the study file." if final else ", not declared final."))


def unfinished(study_dir: Path) -> tuple[int, int] | None:
    """(finished, all) pipeline runs of a report whose ``results.csv`` has rows not finished (a run cut short
    and committed so that ``ptqlib run --missing`` goes on from it), else None."""
    try:
        status = pd.read_csv(study_dir / "results.csv", usecols=["status"], keep_default_na=False)["status"]
    except (OSError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError):
        return None  # no results table (a claims table alone): nothing says the run is unfinished
    done = int((status == "ok").sum())
    return (done, len(status)) if done < len(status) else None


def partial_line(name: str, link: str, counts: tuple[int, int]) -> str:
    """The line of a study whose run is not finished: its verdicts would be those of fewer seeds than it declares."""
    return (f"- **{name}** ([report]({link})): run in progress, {counts[0]} of {counts[1]} pipeline runs finished; "
            "its verdicts wait for the rest (`python -m ptqlib run parameters/" + name + ".yaml --missing`).")


def decided_rows(name: str, table: pd.DataFrame) -> list[str]:
    """Table rows of a study's claims decided after Holm and not flagged: verdict, difference, interval,
    adjusted p."""
    rows = []
    keep = table["verdict_holm"].isin(["holds", "does not hold"]) & ~_flagged(table)
    cells = table["cell"].fillna("").astype(str) if "cell" in table else pd.Series("", index=table.index)
    for r, cell in zip(table[keep].itertuples(), cells[keep]):
        ci = f"{_num(r.difference)} [{_num(r.ci_low)}, {_num(r.ci_high)}]"
        rows.append(f"| {name} | {_cell(labelled(r.claim, cell))} | `{_cell(r.tested)}` | {r.metric} | "
                    f"{r.verdict_holm} | {ci} | {r.p_holm:.2g} |")
    return rows


def cell_lines(table: pd.DataFrame) -> list[str]:
    """For a study over several models or tasks: per claim, in how many cells it holds, does not hold or stays
    undecided after Holm (``cells.cell_counts``): whether the finding generalises."""
    return [f"  - {_cell(r.claim)}: {counts_text(r)}" for r in cell_counts(table).itertuples()]


def _cell(text) -> str:
    # a '|' (as in |a - b| < m) would end the table cell, a line break the row
    return " ".join(str(text).split()).replace("|", "\\|")


def render(reports: str | Path, relative_to: str | Path = ".") -> str:
    """The findings text (without the markers) from every ``<reports>/<study>/claims.csv``."""
    reports = Path(reports)
    paths = sorted(reports.glob("*/claims.csv"))
    if not paths:
        raise FileNotFoundError(f"{reports}: no <study>/claims.csv; run or analyse a study first")
    lines = [f"<!-- generated by `python -m ptqlib findings` from {reports.name}/*/claims.csv: do not edit -->", ""]
    rows = []
    for path in paths:
        table = _claims(path)
        link = Path(os.path.relpath(path.parent / "index.html", Path(relative_to)))  # as the README links it
        if counts := unfinished(path.parent):
            lines.append(partial_line(path.parent.name, link.as_posix(), counts))
            continue
        try:
            lines.append(counts_line(path.parent.name, table, link.as_posix()) + run_line(path.parent))
            lines += cell_lines(table)
            rows += decided_rows(path.parent.name, table)
        except (AttributeError, TypeError, ValueError, KeyError) as e:  # a hand-edited or truncated file
            raise ValueError(f"{path}: not a claims table as ptqlib writes it ({type(e).__name__}: {e}); re-decide it "
                             "with python -m ptqlib analyse parameters/<study>.yaml") from None
    lines.append("")
    if not rows:
        return "\n".join(lines + ["No claim is decided after Holm (floor and ceiling claims aside).", ""])
    head = ["Claims decided after Holm, floor and ceiling claims aside (family: the study, every tested claim "
            "in both directions; 95% interval; p: Holm-adjusted, one-sided, of the verdict's direction):", "",
            "| study (Holm family) | claim | tested | metric | verdict | difference [95% CI] | p (Holm) |",
            "|---|---|---|---|---|---|---|"]
    return "\n".join(lines + head + rows + [""])


def replace_block(text: str, block: str, where: str = "README") -> str:
    """``text`` with everything between the markers replaced by ``block``."""
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ValueError(f"{where}: needs one {BEGIN} line and, after it, one {END} line")
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    return f"{head}{BEGIN}\n{block}{END}{tail}"


def update(readme: str | Path, reports: str | Path, check: bool = False) -> tuple[bool, str]:
    """(up to date, unified diff). Writes the README unless ``check``."""
    readme = Path(readme)
    old = readme.read_text()
    new = replace_block(old, render(reports, readme.parent), str(readme))
    diff = "".join(difflib.unified_diff(old.splitlines(True), new.splitlines(True), f"{readme} (committed)",
                                        f"{readme} (generated)"))
    if not check and new != old:
        write_atomic(readme, new)
    return new == old, diff

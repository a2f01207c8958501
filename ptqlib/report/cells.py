"""Model and task as factors of a claim: one verdict per cell, and how many cells each claim holds in.

A study may sweep ``model:`` and ``task:`` (``study.expand``): each (model, task) pair is a *cell*, its
pipelines labelled ``[model=..., task=...]`` (results.csv's ``grid.model`` / ``grid.task``). A claim names
families (``a``, ``b``), so over a sweep it is decided once per cell, on that cell's runs and units only
(:func:`per_cell`): a difference on SmolLM2 says nothing about Gemma's. Every cell's verdict enters the
study's Holm family, so a sweep makes each verdict stricter. :func:`cell_counts` says, per claim, in how
many cells it holds, does not hold or stays undecided after Holm: whether a finding generalises.

Over tasks, ``metric: task_score`` reads each task's own score (``metrics.task_score``: field F1 on the
meetings tasks, ROUGE-L on stdlib-docstrings).
"""
from __future__ import annotations

import pandas as pd

FACTORS = ("model", "task")


def factors(results: pd.DataFrame) -> list[str]:
    """The factors ``results`` sweeps (a ``grid.<factor>`` column with values)."""
    return [f for f in FACTORS if f"grid.{f}" in results and results[f"grid.{f}"].notna().any()]


def per_cell(results: pd.DataFrame, units: pd.DataFrame | None,
             families: list[str]) -> list[tuple[str, pd.DataFrame, pd.DataFrame | None]]:
    """``(cell label, its results, its units)`` for every cell in which any of ``families`` ran, in the order
    the results list them; ``[("", results, units)]`` for a study that sweeps neither models nor tasks."""
    fs = factors(results)
    if not fs:
        return [("", results, units)]
    cols = [f"grid.{f}" for f in fs]
    keys = results.loc[results["family"].isin(families), cols].astype(str).drop_duplicates()
    out = []
    for key in keys.itertuples(index=False):
        mask = (results[cols].astype(str) == list(key)).all(axis=1)
        cell = results[mask]
        label = ", ".join(f"{f}={v}" for f, v in zip(fs, key))
        out.append((label, cell, None if units is None else units[units["pipeline"].isin(cell["pipeline"])]))
    return out


def labelled(claim: str, cell: str) -> str:
    """A claim's text with its cell, where it has one: ``claim [model=..., task=...]``."""
    return f"{claim} [{cell}]" if cell else claim


def cell_counts(table: pd.DataFrame) -> pd.DataFrame:
    """Per claim of a claims table with a ``cell`` column: ``cells``, and how many ``hold``, ``do_not_hold`` and
    are ``undecided`` after Holm (``verdict_holm``), in the claims' order. Empty without cells."""
    if "cell" not in table or not table["cell"].fillna("").astype(str).str.len().any():
        return pd.DataFrame(columns=["claim", "cells", "hold", "do_not_hold", "undecided"])
    v = table["verdict_holm"].astype(str)
    counts = pd.DataFrame({"claim": table["claim"], "hold": v == "holds", "do_not_hold": v == "does not hold"})
    out = counts.groupby("claim", sort=False).agg(cells=("hold", "size"), hold=("hold", "sum"),
                                                  do_not_hold=("do_not_hold", "sum")).reset_index()
    out["undecided"] = out["cells"] - out["hold"] - out["do_not_hold"]
    return out.astype({"cells": int, "hold": int, "do_not_hold": int, "undecided": int})


def counts_text(row) -> str:
    """``holds in 2 of 4 cells, does not hold in 1, undecided in 1``."""
    return (f"holds in {row.hold} of {row.cells} cell{'s' if row.cells != 1 else ''}, does not hold in "
            f"{row.do_not_hold}, undecided in {row.undecided}")

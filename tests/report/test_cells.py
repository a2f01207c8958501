"""Claims over a model x task sweep: one verdict per cell on that cell's runs only, Holm over every cell,
and the per-claim counts the findings print."""
import numpy as np
import pandas as pd
import pytest

from ptqlib.report.cells import cell_counts, counts_text, factors, labelled, per_cell
from ptqlib.report.claims import check_claims
from ptqlib.report.findings import cell_lines, counts_line, decided_rows
from ptqlib.report.plan import plan_claims

RNG = np.random.default_rng(7)
BASE = RNG.uniform(0.3, 0.9, size=(3, 96))


def sweep(shift: dict):
    """results + units of families a and b over cells (model, task) -> a's shift over b in that cell."""
    rows, units = [], []
    for (model, task), d in shift.items():
        for fam, delta in (("a", d), ("b", 0.0)):
            for seed in range(3):
                vals = np.clip(BASE[seed] + delta + RNG.normal(0, 0.01, 96), 0, 1)
                name = f"{fam}[model={model},task={task},seed={seed}]"
                rows.append({"pipeline": name, "family": fam, "model": model, "task": task, "seed": seed,
                             "grid.model": model, "grid.task": task, "grid.seed": seed,
                             "stages": "finetune(lora) -> evaluate", "task_score": vals.mean(), "status": "ok"})
                units += [{"pipeline": name, "family": fam, "seed": seed, "group": "task", "unit": i, "task_score": v}
                          for i, v in enumerate(vals)]
    return pd.DataFrame(rows), pd.DataFrame(units)


CLAIM = [{"claim": "a beats b", "a": "a", "b": "b", "metric": "task_score", "relation": ">"}]


def test_a_claim_is_decided_in_each_cell_on_that_cells_runs():
    res, units = sweep({("m1", "t1"): 0.10, ("m1", "t2"): 0.0, ("m2", "t1"): -0.10})
    assert factors(res) == ["model", "task"]
    table = check_claims(CLAIM, res, units)
    assert table["cell"].tolist() == ["model=m1, task=t1", "model=m1, task=t2", "model=m2, task=t1"]
    assert table["claim"].tolist() == ["a beats b"] * 3
    assert table["difference"].to_numpy() == pytest.approx([0.10, 0.0, -0.10], abs=0.01)
    assert [v.split(" (")[0] for v in table["verdict_holm"]] == ["holds", "undecided", "does not hold"]
    assert table["n_examples"].tolist() == [96] * 3  # one cell's units, not the three cells' pooled
    # Holm's family is every cell: 3 tests, so the adjusted p of the decided cells triples the smallest
    p = np.minimum(table["p_holds"], table["p_fails"])
    assert table["p_holm"].min() == pytest.approx(3 * p.min())
    counts = cell_counts(table)
    assert counts.to_dict("records") == [{"claim": "a beats b", "cells": 3, "hold": 1, "do_not_hold": 1,
                                          "undecided": 1}]
    assert counts_text(next(counts.itertuples())) == "holds in 1 of 3 cells, does not hold in 1, undecided in 1"
    assert cell_lines(table) == ["  - a beats b: holds in 1 of 3 cells, does not hold in 1, undecided in 1"]
    rows = decided_rows("s", table)
    assert len(rows) == 2 and "a beats b [model=m1, task=t1]" in rows[0]
    # the study's line counts claims and cells apart: its "tested / hold" counts are of claim x cell rows
    line = counts_line("s", pd.concat([table, table.assign(claim="b beats a")]), "r")
    assert line.startswith("- **s** ([report](r)): 2 claims x 3 cells = 6 tests; 6 tested;"), line


def test_a_study_without_a_sweep_keeps_one_row_per_claim_and_no_cell_column():
    res, units = sweep({("m1", "t1"): 0.10})
    res = res.drop(columns=["grid.model", "grid.task"])
    assert factors(res) == [] and [c for c, _, _ in per_cell(res, units, ["a", "b"])] == [""]
    table = check_claims(CLAIM, res, units)
    assert len(table) == 1 and "cell" not in table and cell_counts(table).empty and cell_lines(table) == []
    assert labelled("c", "") == "c" and labelled("c", "task=t") == "c [task=t]"


def test_the_plan_has_a_row_per_cell():
    res, units = sweep({("m1", "t1"): 0.10, ("m2", "t1"): 0.0})
    plan = plan_claims(CLAIM, res, units)
    assert plan["claim"].tolist() == ["a beats b [model=m1, task=t1]", "a beats b [model=m2, task=t1]"]
    assert plan["n_units"].tolist() == [96, 96]


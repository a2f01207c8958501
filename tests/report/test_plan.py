"""``ptqlib plan``: variance components from recorded units, the seeds that would decide a claim, their cost."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from ptqlib.report.claims import decide
from ptqlib.report.plan import MAX_SEEDS, plan_claims, projected, seeds_needed, variance_components

ROOT = Path(__file__).resolve().parents[2]


def crossed(rng, S: int, N: int, sa: float, sb: float, se: float, delta: float = 0.0) -> np.ndarray:
    """D[s, i] = delta + a_s + b_i + e_si with the given SDs."""
    return (delta + rng.normal(0, sa, (S, 1)) + rng.normal(0, sb, (1, N)) + rng.normal(0, se, (S, N)))


def test_components_are_recovered():
    """Many seeds and units: each estimated SD within 10% of the simulated one (averaged over 40 studies)."""
    rng = np.random.default_rng(0)
    est = np.array([variance_components(crossed(rng, 30, 400, 0.03, 0.05, 0.1)) for _ in range(40)]).mean(0)
    assert np.sqrt(est) == pytest.approx([0.03, 0.05, 0.1], rel=0.1)
    one = variance_components(crossed(rng, 1, 400, 0.03, 0.05, 0.1))
    assert np.isnan(one[0])  # one seed: the seed part is not estimable


def _decided(signed, comp, S, N, relation=">", m=0.0):
    se, df = projected(comp, S, N, N)
    half = stats.t.ppf(0.975, df) * se
    return not decide(relation, signed - half, signed + half, m).startswith("undecided")


@pytest.mark.parametrize("signed, comp", [(0.05, (0.03 ** 2, 0.0, 0.1 ** 2)), (0.02, (0.02 ** 2, 0.01 ** 2, 0.1 ** 2)),
                                          (-0.03, (0.05 ** 2, 0.0, 0.0))])
def test_seeds_needed_is_the_first_count_that_decides(signed, comp):
    S = seeds_needed(signed, comp, 128, 128.0, ">", 0.0)
    assert S is not None and _decided(signed, comp, S, 128)
    assert S == 3 or not _decided(signed, comp, S - 1, 128)


def test_a_large_seed_part_needs_more_seeds():
    small = seeds_needed(0.02, (0.01 ** 2, 0.0, 0.05 ** 2), 128, 128.0, ">", 0.0)
    large = seeds_needed(0.02, (0.04 ** 2, 0.0, 0.05 ** 2), 128, 128.0, ">", 0.0)
    assert small < large


def test_no_seeds_decide_when_the_example_part_spans_the_boundary():
    # se of the example part alone: 0.1 / sqrt(128) = 0.0088 > 0.005 / 1.96
    assert seeds_needed(0.005, (0.01 ** 2, 0.1 ** 2, 0.0), 128, 128.0, ">", 0.0) is None
    assert seeds_needed(0.005, (0.01 ** 2, 0.0, 0.0), 128, 128.0, ">", 0.0) <= MAX_SEEDS


def _records(rng, S=3, N=64):
    """Two trained pipelines a (= b + 0.03 + seed noise) and b sharing their fine-tuning stage per seed."""
    base = rng.uniform(0.3, 0.9, (1, N))
    vals = {"a": base + 0.03 + rng.normal(0, 0.02, (S, 1)) + rng.normal(0, 0.05, (S, N)), "b": base + np.zeros((S, N))}
    rows, units = [], []
    for fam, v in vals.items():
        for s in range(S):
            rows.append({"pipeline": f"{fam}[seed={s}]", "family": fam, "seed": s, "status": "ok",
                         "stages": "finetune(full) -> quantize(nf4) -> evaluate" if fam == "a" else "finetune(full) -> evaluate",
                         "field_f1": v[s].mean(), "wall_s.finetune": 100.0,
                         **({"wall_s.quantize": 10.0} if fam == "a" else {}), "wall_s.evaluate": 30.0})
            units += [{"family": fam, "seed": s, "group": "task", "unit": i, "field_f1": x} for i, x in enumerate(v[s])]
    chains = {f"{fam}[seed={s}]": ([f"ft{s}", f"q{s}", f"ea{s}"] if fam == "a" else [f"ft{s}", f"eb{s}"])
              for fam in vals for s in range(S)}
    kinds = {sid: {"ft": "finetune", "q": "quantize", "ea": "evaluate", "eb": "evaluate"}[sid.rstrip("0123456789")]
             for c in chains.values() for sid in c}
    return pd.DataFrame(rows), pd.DataFrame(units), chains, kinds


def test_plan_of_synthetic_records():
    results, units, chains, kinds = _records(np.random.default_rng(3))
    claims = [{"claim": "a beats b", "a": "a", "b": "b", "metric": "field_f1", "relation": ">"}]
    d = plan_claims(claims, results, units, chains, kinds).loc[0, "difference"]
    claims.append({"claim": "a beats b by exactly its estimate", "a": "a", "b": "b", "metric": "field_f1",
                   "relation": ">", "min_effect": d})  # at the boundary: no number of seeds decides it
    t = plan_claims(claims, results, units, chains, kinds)
    assert t.loc[0, "n_seeds"] == 3 and t.loc[0, "n_units"] == 64 and t.loc[0, "n_eff"] == 64
    assert t.loc[0, "seed_cpu_s"] == 100 + 10 + 30 + 30  # the shared fine-tuning once
    assert t.loc[0, "seeds_needed"] >= 3 and t.loc[0, "extra_cpu_h"] == pytest.approx(
        (t.loc[0, "seeds_needed"] - 3) * 170 / 3600)
    assert 0 < t.loc[0, "seed_share"] <= 1
    assert "no number of seeds" in t.loc[1, "note"] and pd.isna(t.loc[1, "seeds_needed"])
    # one seed's fine-tuning slowed 20-fold (a paused run, another process on the cores): the cost of a seed is
    # the typical seed's, not pulled up by the outlier (a mean would say 170 + 1900 / 3)
    slow = results.assign(**{"wall_s.finetune": np.where(results["seed"] == 2, 2000.0, 100.0)})
    assert plan_claims(claims[:1], slow, units, chains, kinds).loc[0, "seed_cpu_s"] == 170


def test_plan_command_on_the_committed_default_study(tmp_path, capsys):
    import shutil

    from ptqlib.cli import main

    reports = tmp_path / "reports"
    shutil.copytree(ROOT / "reports" / "default", reports / "default")
    assert main(["plan", str(ROOT / "parameters" / "default.yaml"), "--reports", str(reports)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("default: 12 claims") and out.count("\n- ") == 12 and "decided at" in out
    plan = pd.read_csv(reports / "default" / "plan.csv")
    assert len(plan) == 12 and plan["seeds_needed"].dropna().between(3, MAX_SEEDS).all()
    assert main(["plan", str(ROOT / "parameters" / "default.yaml"), "--reports", str(tmp_path / "none")]) == 2


def test_the_plan_is_the_same_bytes_whatever_the_hash_seed(tmp_path):
    """plan.csv of the committed default study in two processes with different PYTHONHASHSEED: identical
    (the CPU seconds once summed a set of stage ids, whose order moves with the hash seed)."""
    import os
    import shutil
    import subprocess
    import sys

    out = []
    for h in ("1", "2"):
        reports = tmp_path / h
        shutil.copytree(ROOT / "reports" / "default", reports / "default")
        subprocess.run([sys.executable, "-m", "ptqlib", "plan", str(ROOT / "parameters" / "default.yaml"), "--reports",
                        str(reports)], check=True, capture_output=True, env={**os.environ, "PYTHONHASHSEED": h})
        out.append((reports / "default" / "plan.csv").read_bytes())
    assert out[0] == out[1]
    # and the committed one: the same text, numbers to the last few bits (numpy's sums take another SIMD order on a
    # CPU without AVX-512: -0.7065217436946245 there, ...227 here)
    import io

    here = pd.read_csv(io.BytesIO(out[0]), keep_default_na=False)
    committed = pd.read_csv(ROOT / "reports" / "default" / "plan.csv", keep_default_na=False)
    assert list(here.columns) == list(committed.columns) and len(here) == len(committed)
    for col in committed:
        if pd.api.types.is_numeric_dtype(committed[col]) and pd.api.types.is_numeric_dtype(here[col]):
            assert np.allclose(here[col], committed[col], rtol=1e-12, atol=1e-15, equal_nan=True), col
        else:
            assert here[col].tolist() == committed[col].tolist(), col


def test_a_recovered_fraction_claim_is_planned_on_its_contrast():
    """'(m - ptq) / (ref - ptq) > 0.3' with R = 0.5 is decided now; at a boundary equal to its estimate no number
    of seeds decides it (the plan reads the contrast (m - ptq) - 0.3 (ref - ptq), not m - ptq)."""
    rng = np.random.default_rng(5)
    shared = rng.normal(0, 0.1, 128)
    rows, units = [], []
    for fam, mu in (("m", 0.7), ("ptq", 0.6), ("ref", 0.8)):
        for s in range(5):
            v = mu + rng.normal(0, 0.01) + shared + rng.normal(0, 0.05, 128)
            rows.append({"pipeline": f"{fam}[seed={s}]", "family": fam, "seed": s, "status": "ok",
                         "stages": "finetune(full) -> evaluate", "field_f1": v.mean()})
            units += [{"family": fam, "seed": s, "group": "task", "unit": i, "field_f1": x} for i, x in enumerate(v)]
    results, units = pd.DataFrame(rows), pd.DataFrame(units)
    means = results.groupby("family")["field_f1"].mean()
    frac = (means["m"] - means["ptq"]) / (means["ref"] - means["ptq"])
    claim = {"claim": "c", "a": "m", "b": "ptq", "ref": "ref", "metric": "field_f1", "relation": ">"}
    t = plan_claims([{**claim, "min_effect": 0.3}, {**claim, "min_effect": frac}], results, units)
    assert t.loc[0, "verdict_now"] == "holds" and t.loc[0, "seeds_needed"] <= 5
    assert t.loc[0, "difference"] == pytest.approx(frac)  # the fraction, as in claims.csv
    assert "no number of seeds" in t.loc[1, "note"]


@pytest.mark.parametrize("native", [True, False])
def test_the_plan_costs_the_reports_own_stages_on_any_cpu(tmp_path, monkeypatch, native):
    """The default study ran where ``precision: auto`` is bf16; on a CPU without bf16 its ids would differ and the
    CPU seconds per seed would come from the wrong stages (560 s -> 148 s for NF4 -> QLoRA): the plan resolves
    ``auto`` as the report's machine did."""
    import shutil

    from ptqlib import precision
    from ptqlib.report import tables
    from ptqlib.report.plan import plan_study
    from ptqlib.study.schema import load_study

    monkeypatch.setattr(precision, "bf16_native", lambda device=None: (native, "test"))
    shutil.copytree(ROOT / "reports" / "default", tmp_path / "default")
    table = plan_study(load_study(ROOT / "parameters" / "default.yaml", allow_network=False), tmp_path, tables)
    committed = pd.read_csv(ROOT / "reports" / "default" / "plan.csv")
    assert np.allclose(table["seed_cpu_s"], committed["seed_cpu_s"], rtol=1e-9, equal_nan=True)

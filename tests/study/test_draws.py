"""Calibration draws nested in seeds: ``draws: K`` on a calibrating quantize stage (study schema and claims)."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ptqlib.errors import ConfigError
from ptqlib.report.claims import check_claims
from ptqlib.seeding import derive_seed
from ptqlib.study.graph import build_graph
from ptqlib.study.schema import load_study

STUDY = """
study: draws
model: tiny
task: meetings
seeds: [0, 1]
defaults:
  finetune: {steps: 2, batch_size: 2, train_samples: 8, max_length: 192}
  quantize: {group_size: 32, calib_samples: 4, calib_seq_len: 64}
pipelines:
  ft16: [{finetune: full}]
  ft_gptq:
    - finetune: full
    - quantize: {method: gptq, bits: 4QUANT}
  ft_gptq_qlora:
    - finetune: full
    - quantize: {method: gptq, bits: 4QUANT}
    - finetune: qlora
claims:
  - {claim: x, a: ft16, b: ft_gptq, metric: field_f1, relation: ">"}
"""


def _load(tmp_path: Path, quant: str = ", draws: 2", name: str = "s.yaml"):
    f = tmp_path / name
    f.write_text(STUDY.replace("QUANT", quant))
    return load_study(f)


def test_each_seed_gets_its_draws_with_everything_downstream(tmp_path):
    study = _load(tmp_path)
    names = [p.name for p in study.pipelines]
    assert names == ["ft16[seed=0]", "ft16[seed=1]"] + [f"{f}[seed={s},draw={d}]" for f in ("ft_gptq", "ft_gptq_qlora")
                                                         for s in (0, 1) for d in (0, 1)]
    calib = {p.name: next(st.params for st in p.stages if st.kind == "quantize")["calib_seed"]
             for p in study.pipelines if p.family == "ft_gptq"}
    assert calib == {"ft_gptq[seed=0,draw=0]": 0, "ft_gptq[seed=0,draw=1]": derive_seed(0, "calibration", "1"),
                     "ft_gptq[seed=1,draw=0]": 1, "ft_gptq[seed=1,draw=1]": derive_seed(1, "calibration", "1")}
    assert all("draws" not in st.params for p in study.pipelines for st in p.stages)  # not a stage setting
    nodes, chains = build_graph(study)
    # both draws of a seed share its fine-tuning; the QLoRA pass runs once per draw
    assert chains["ft_gptq[seed=0,draw=0]"][0] == chains["ft_gptq[seed=0,draw=1]"][0]
    assert chains["ft_gptq_qlora[seed=0,draw=0]"][2] != chains["ft_gptq_qlora[seed=0,draw=1]"][2]


def test_draw_zero_is_the_study_without_draws(tmp_path):
    """Stage ids of draw 0 are those of the same study with one draw: adding draws re-runs nothing cached."""
    with_draws = build_graph(_load(tmp_path))[1]
    without = build_graph(_load(tmp_path, quant="", name="t.yaml"))[1]
    for name, chain in without.items():
        if "ft_gptq" in name:
            assert with_draws[name.replace("]", ",draw=0]")] == chain
            assert with_draws[name.replace("]", ",draw=1]")][1] not in chain


@pytest.mark.parametrize("quant, message", [(", draws: 0", "must be an integer >= 1"),
                                            (", draws: [1, 2]", "not a grid"),
                                            (", draws: 2, calib_seed: 5", "calib_seed -1")])
def test_bad_draws_are_refused_naming_the_value(tmp_path, quant, message):
    with pytest.raises(ConfigError, match=message):
        _load(tmp_path, quant)


def test_draws_need_a_calibrating_method(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text(STUDY.replace("{method: gptq, bits: 4QUANT}", "{method: nf4, draws: 2}"))
    with pytest.raises(ConfigError, match="'nf4' calibrates on no windows"):
        load_study(f)


def _records(draw_shift: float):
    """ft16 (3 seeds) and ft_gptq (3 seeds x 2 draws): draw 1 scores ``draw_shift`` lower on every example."""
    rng = np.random.default_rng(0)
    base = rng.uniform(0.3, 0.9, 64)
    rows, units = [], []

    def add(name, fam, seed, vals, draw=None):
        rows.append({"pipeline": name, "family": fam, "seed": seed, "status": "ok", "stages": "finetune(full) -> evaluate",
                     "field_f1": vals.mean(), **({"grid.draw": draw} if draw is not None else {})})
        units.extend({"pipeline": name, "family": fam, "seed": seed, "group": "task", "unit": i, "field_f1": v}
                     for i, v in enumerate(vals))

    for s in range(3):
        add(f"ft16[seed={s}]", "ft16", s, base + 0.1 + 0.01 * s)
        for d in range(2):
            add(f"ft_gptq[seed={s},draw={d}]", "ft_gptq", s, base - draw_shift * d, d)
    return pd.DataFrame(rows), pd.DataFrame(units)


def test_claims_average_a_seeds_draws():
    results, units = _records(0.04)
    t = check_claims([{"claim": "x", "a": "ft16", "b": "ft_gptq", "metric": "field_f1", "relation": ">"}], results, units)
    assert t.loc[0, "n_seeds"] == 3 and t.loc[0, "n_examples"] == 64  # seeds are the replicates, not runs
    assert t.loc[0, "difference"] == pytest.approx(0.1 + 0.01 + 0.02)  # the draws' mean: 0.04 / 2 lower
    assert t.loc[0, "verdict"] == "holds"

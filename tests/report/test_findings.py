"""The README's findings are generated from the committed claims files, never copied by hand."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ptqlib.cli import main
from ptqlib.report import findings
from ptqlib.report.analysis import write_claims

ROOT = Path(__file__).resolve().parents[2]


def test_committed_readme_findings_are_the_generated_ones():
    same, diff = findings.update(ROOT / "README.md", ROOT / "reports", check=True)
    assert same, f"README.md's findings differ from reports/*/claims.csv; run python -m ptqlib findings\n{diff}"


def _study(reports: Path, name: str, seeds: int, shift: float) -> None:
    """reports/<name>/claims.csv for two trained pipelines, b + shift vs b, and a claim that fails."""
    rng = np.random.default_rng(seeds)
    base = rng.uniform(0.3, 0.9, size=(seeds, 64))
    rows, units = [], []
    for fam, vals in (("a", np.clip(base + shift + rng.normal(0, 0.02, base.shape), 0, 1)), ("b", base)):
        for s in range(seeds):
            rows.append({"pipeline": f"{fam}[seed={s}]", "family": fam, "seed": s, "status": "ok",
                         "stages": "finetune(lora) -> evaluate", "field_f1": vals[s].mean()})
            units += [{"family": fam, "seed": s, "group": "task", "unit": i, "field_f1": v}
                      for i, v in enumerate(vals[s])]
    claims = [{"claim": f"{name}: a beats b", "a": "a", "b": "b", "metric": "field_f1", "relation": ">"},
              {"claim": f"{name}: a beats b by 0.5", "a": "a", "b": "b", "metric": "field_f1", "relation": ">",
               "min_effect": 0.5}]
    (reports / name).mkdir(parents=True)
    write_claims(claims, pd.DataFrame(rows), pd.DataFrame(units), reports / name)


def test_findings_from_a_reports_dir(tmp_path):
    reports = tmp_path / "reports"
    _study(reports, "three", seeds=3, shift=0.1)  # decided: the first claim holds, also after Holm
    _study(reports, "two", seeds=2, shift=0.1)  # 2 seeds of trained pipelines: nothing tested
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nintro\n\n{findings.BEGIN}\nhand-copied table\n{findings.END}\n\nrest\n")

    same, diff = findings.update(readme, reports, check=True)
    assert not same and "-hand-copied table" in diff and "hand-copied" in readme.read_text()  # --check writes nothing
    assert main(["findings", "--check", "--readme", str(readme), "--reports", str(reports)]) == 1
    assert main(["findings", "--readme", str(readme), "--reports", str(reports)]) == 0
    assert main(["findings", "--check", "--readme", str(readme), "--reports", str(reports)]) == 0

    text = readme.read_text()
    assert text.startswith("# x\n\nintro\n\n") and text.endswith(f"{findings.END}\n\nrest\n")
    assert ("- **three** ([report](reports/three/index.html)): 2 claims; 2 tested; 1 hold; "
            "after Holm 1 hold, 1 do not.") in text
    assert "- **two** ([report](reports/two/index.html)): 2 claims; 0 tested (2 need >= 3 paired seeds); " \
           "0 hold; after Holm 0 hold, 0 do not." in text
    rows = [line for line in text.splitlines() if line.startswith("| three |")]
    assert "three: a beats b |" in rows[0] and "`a - b > 0`" in rows[0] and "| holds |" in rows[0] and "[+0." in rows[0]
    assert "three: a beats b by 0.5 |" in rows[1] and "| does not hold |" in rows[1]  # Holm in both directions
    assert "| two |" not in text  # only claims decided after Holm are listed


def test_floor_and_ceiling_claims_stay_out_of_the_table(tmp_path):
    reports = tmp_path / "reports"
    _study(reports, "three", seeds=3, shift=0.1)
    table = pd.read_csv(reports / "three" / "claims.csv", dtype={"flags": str})
    table.loc[0, "flags"] = "b at floor (field_f1 0.000)"
    table.to_csv(reports / "three" / "claims.csv", index=False)
    text = findings.render(reports)
    assert "after Holm 1 hold, 1 do not (1 at a floor or ceiling, left out below)." in text
    assert "three: a beats b |" not in text and "three: a beats b by 0.5 |" in text


def test_findings_errors_name_the_problem(tmp_path):
    reports = tmp_path / "reports"
    with pytest.raises(FileNotFoundError, match="no <study>/claims.csv"):
        findings.render(reports)
    (reports / "old").mkdir(parents=True)
    pd.DataFrame([{"claim": "c", "verdict": "holds"}]).to_csv(reports / "old" / "claims.csv", index=False)
    with pytest.raises(ValueError, match="re-decide it"):
        findings.render(reports)
    readme = tmp_path / "README.md"
    readme.write_text("no markers\n")
    _study(tmp_path / "ok", "s", seeds=3, shift=0.1)
    with pytest.raises(ValueError, match="findings:begin"):
        findings.update(readme, tmp_path / "ok")
    assert main(["findings", "--readme", str(readme), "--reports", str(tmp_path / "ok")]) == 2


def test_a_line_break_in_a_claim_stays_in_its_row(tmp_path):
    reports = tmp_path / "reports"
    _study(reports, "three", seeds=3, shift=0.1)
    table = pd.read_csv(reports / "three" / "claims.csv", dtype={"flags": str})
    table.loc[0, "claim"] = "a beats b\n| injected | row |"
    table.to_csv(reports / "three" / "claims.csv", index=False)
    row = next(line for line in findings.render(reports).splitlines() if line.startswith("| three | a beats b"))
    assert "a beats b \\| injected \\| row \\|" in row and row.count(" | ") == 6  # the table's own 7 cells


@pytest.mark.parametrize("text", ["", "\x00\xff garbage", None])
def test_findings_on_a_malformed_claims_file_names_it(tmp_path, capsys, text):
    reports = tmp_path / "reports"
    _study(reports, "three", seeds=3, shift=0.1)
    path = reports / "three" / "claims.csv"
    if text is None:  # every column there, but numbers where text belongs
        table = pd.read_csv(path)
        table["verdict"] = 1.5
        table["verdict_holm"] = 2
        table.to_csv(path, index=False)
    else:
        path.write_bytes(text.encode("latin-1"))
    readme = tmp_path / "README.md"
    readme.write_text(f"{findings.BEGIN}\n{findings.END}\n")
    assert main(["findings", "--readme", str(readme), "--reports", str(reports)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "Traceback" not in err


def test_each_study_line_names_its_run_and_whether_it_is_declared_final(tmp_path):
    import json

    from ptqlib.report.analysis import append_history

    reports = tmp_path / "reports"
    _study(reports, "three", seeds=3, shift=0.1)  # write_claims recorded the run in history.csv
    assert "Analysed " in findings.render(reports) and "seeds 0-2), not declared final." in findings.render(reports)
    (reports / "three" / "study.json").write_text(json.dumps({"final": True}))
    table = pd.read_csv(reports / "three" / "claims.csv")
    append_history(table, pd.DataFrame({"seed": [0, 1, 2, 3, 4], "machines": ["AMD EPYC (cpu, 2 threads)"] * 5}),
                   reports / "three")
    line = next(x for x in findings.render(reports).splitlines() if x.startswith("- **three**"))
    assert line.endswith("(machines: AMD EPYC (cpu, 2 threads); seeds 0-4), declared final in the study file.")


def test_final_must_be_true_or_false(tmp_path):
    from ptqlib.errors import ConfigError
    from ptqlib.study.schema import load_study

    f = tmp_path / "s.yaml"
    f.write_text("model: tiny\nfinal: yes please\npipelines:\n  base: []\n")
    with pytest.raises(ConfigError, match="final: 'yes please'"):
        load_study(f)
    f.write_text("model: tiny\nfinal: true\npipelines:\n  base: []\n")
    assert load_study(f).final is True


def test_an_unfinished_run_gives_its_progress_and_no_verdicts(tmp_path):
    """A report committed part-way (rows of results.csv not ok, so that ``run --missing`` goes on from it) would
    quote verdicts of fewer seeds than the study declares: its line says how far it got, its claims stay out."""
    reports = tmp_path / "reports"
    _study(reports, "three", seeds=3, shift=0.1)
    results = reports / "three" / "results.csv"
    pd.DataFrame([{"pipeline": f"a[seed={s}]", "status": "ok"} for s in range(3)]
                 + [{"pipeline": "a[seed=3]", "status": "missing"}]).to_csv(results, index=False)
    text = findings.render(reports, relative_to=tmp_path)
    assert ("- **three** ([report](reports/three/index.html)): run in progress, 3 of 4 pipeline runs finished; its "
            "verdicts wait for the rest (`python -m ptqlib run parameters/three.yaml --missing`).") in text
    assert "| three |" not in text and "No claim is decided after Holm" in text
    pd.DataFrame([{"pipeline": f"a[seed={s}]", "status": "ok"} for s in range(4)]).to_csv(results, index=False)
    assert "| three |" in findings.render(reports, relative_to=tmp_path)  # finished: its verdicts are quoted

"""Each stage notebook runs on its defaults, as it does when opened in JupyterLab."""
import papermill as pm
import pytest

from ptqlib.engine.stage import ROOT

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", ["01_quantize", "02_finetune", "03_evaluate"])
def test_notebook_runs_on_defaults(name, tmp_path):
    out = tmp_path / name
    nb = pm.execute_notebook(str(ROOT / "notebooks" / f"{name}.ipynb"), str(tmp_path / f"{name}.ipynb"),
                             parameters={"output_dir": str(out), "progress": False}, kernel_name="ptqlib",
                             cwd=str(ROOT / "notebooks"), progress_bar=False)
    assert (out / "outputs.json").exists()
    shown = {o.get("output_type") for c in nb.cells for o in c.get("outputs", [])}
    assert shown & {"display_data", "execute_result"}, shown  # a plot or a table was shown


def test_the_analysis_notebook_runs_on_its_defaults_and_writes_only_its_report(tmp_path):
    """04 on its defaults reads the committed smoke report (here a copy, since it rewrites its tables) and runs
    no study; without results it stops with the command to run, before anything is written."""
    import shutil

    study_dir = tmp_path / "reports" / "smoke"
    shutil.copytree(ROOT / "reports" / "smoke", study_dir)
    nb = pm.execute_notebook(str(ROOT / "notebooks" / "04_analyse.ipynb"), str(tmp_path / "04.ipynb"),
                             parameters={"study_dir": str(study_dir)}, kernel_name="ptqlib",
                             cwd=str(ROOT / "notebooks"), progress_bar=False)
    shown = {o.get("output_type") for c in nb.cells for o in c.get("outputs", [])}
    assert "display_data" in shown and (study_dir / "claims.csv").exists()
    empty = tmp_path / "reports" / "none"
    empty.mkdir()
    with pytest.raises(pm.PapermillExecutionError, match="no results to analyse yet; run the study first"):
        pm.execute_notebook(str(ROOT / "notebooks" / "04_analyse.ipynb"), str(tmp_path / "04b.ipynb"),
                            parameters={"study_dir": str(empty)}, kernel_name="ptqlib",
                            cwd=str(ROOT / "notebooks"), progress_bar=False)
    assert list(empty.iterdir()) == []

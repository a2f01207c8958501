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

"""Each stage notebook runs on its defaults, as it does when opened in JupyterLab: 01 -> 02 -> 03 is a chain
(02 fine-tunes what 01 quantized, 03 evaluates what 02 trained against 01's input)."""
import json

import papermill as pm
import pytest

from ptqlib.engine.stage import ROOT
from ptqlib.methods import DEFAULT_FINETUNE_ON_QUANTIZED, DEFAULT_QUANTIZE

pytestmark = pytest.mark.slow


def _run(name: str, cwd, **parameters):
    return pm.execute_notebook(str(ROOT / "notebooks" / f"{name}.ipynb"), str(cwd / f"{name}.ipynb"),
                               parameters={"progress": False, **parameters}, kernel_name="ptqlib",
                               cwd=str(cwd), progress_bar=False)


def test_the_stage_notebooks_chain_on_their_defaults(tmp_path):
    """In a fresh checkout's layout (notebooks/ beside runs/), 01, 02 and 03 run one after the other with
    nothing set but the progress bars, each reading the previous one's output."""
    here = tmp_path / "notebooks"
    here.mkdir()
    runs = tmp_path / "runs" / "_interactive"
    books = {}
    for name in ("01_quantize", "02_finetune", "03_evaluate"):
        books[name] = _run(name, here)
        assert (runs / name / "outputs.json").exists(), name
    for name, nb in books.items():
        shown = {o.get("output_type") for c in nb.cells for o in c.get("outputs", [])}
        assert shown & {"display_data", "execute_result"}, (name, shown)  # a plot or a table was shown
    quantized = json.loads((runs / "01_quantize" / "artifact.json").read_text())
    trained = json.loads((runs / "02_finetune" / "artifact.json").read_text())
    metrics = json.loads((runs / "03_evaluate" / "outputs.json").read_text())["metrics"]
    assert quantized["method"] == DEFAULT_QUANTIZE and quantized["type"] == "quant"
    assert trained["base"] == "../01_quantize"  # the adapter sits on 01's codes
    printed = "".join(o.get("text", "") for c in books["02_finetune"].cells for o in c.get("outputs", []))
    assert f"{DEFAULT_FINETUNE_ON_QUANTIZED}: " in printed  # "qlora: 1,234 trainable of ..."
    assert metrics["kl"] > 0 and metrics["top1_agree"] < 1  # against 01's float input, which RTN codes are not


def test_the_finetune_notebook_alone_says_to_run_01_first(tmp_path):
    """Opened before 01 has run, 02 stops at loading its input with what to run, and writes nothing."""
    here = tmp_path / "notebooks"
    here.mkdir()
    with pytest.raises(pm.PapermillExecutionError, match="run the notebook that writes it first"):
        _run("02_finetune", here)
    assert not (tmp_path / "runs" / "_interactive" / "02_finetune" / "outputs.json").exists()


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

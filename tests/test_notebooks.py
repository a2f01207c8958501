"""Each stage notebook documents (and accepts) every parameter of its stage kind, typed and commented."""
import dataclasses
from pathlib import Path

import nbformat
import papermill as pm
import pytest

from ptqlib.config import EvaluateParams, FinetuneParams, QuantizeParams

NB = Path(__file__).resolve().parent.parent / "notebooks"
COMMON = {"input_model", "output_dir", "task", "seed", "progress"}


@pytest.mark.parametrize("name, cls", [("01_quantize", QuantizeParams), ("02_finetune", FinetuneParams),
                                       ("03_evaluate", EvaluateParams)])
def test_parameters_cell_matches_stage_schema(name, cls):
    params = pm.inspect_notebook(str(NB / f"{name}.ipynb"))
    fields = {f.name: f for f in dataclasses.fields(cls)}
    assert set(params) == set(fields) | COMMON
    for k, info in params.items():
        assert info["inferred_type_name"] != "None", f"{name}.{k} has no type annotation"
        assert info["help"], f"{name}.{k} has no comment"
        if k in fields and fields[k].default is not dataclasses.MISSING:
            assert eval(info["default"]) == fields[k].default, f"{name}.{k}: notebook default differs"


def test_every_notebook_has_a_tagged_parameters_cell_and_no_outputs():
    for path in sorted(NB.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, path
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), f"{path} has outputs"
        assert nb.metadata["kernelspec"]["name"] == "ptqlib"

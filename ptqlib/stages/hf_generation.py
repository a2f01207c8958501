"""transformers' greedy generation: left-padded batches (``evaluate.generation: generate``, the path of
every evaluate stage before ptqlib's own loop, :mod:`ptqlib.stages.generation`), and batch-1 latency.

Both run ``model.generate`` with :class:`~ptqlib.stages.kv_cache.GrowingCache` (the same tokens as
transformers' default cache, without copying the cache at every step) and ``use_cache=True``: a model
whose generation config came from a trained ``config.json`` (``use_cache: false`` after training) would
otherwise re-run the whole prompt for every new token (a K-quant stage's validation evaluate took over
11 min for what takes 100 s).
"""
from __future__ import annotations

import math
import time

import torch
from tqdm.auto import tqdm

from ptqlib.data import format_prompt
from ptqlib.stages.generation import contiguous_head, model_device
from ptqlib.stages.kv_cache import GrowingCache


@torch.no_grad()
def hf_generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int,
                 progress: bool) -> tuple[list[str], int, float]:
    """transformers' ``generate`` on left-padded batches; the KV cache appends in place
    (:class:`~ptqlib.stages.kv_cache.GrowingCache`): the same tokens as its default cache without a copy per step."""
    with contiguous_head(model):  # a peft model's frozen head: see contiguous_head
        return _hf_generate(model, tokenizer, prompts, max_new_tokens, batch_size, progress)


def _hf_generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int,
                 progress: bool) -> tuple[list[str], int, float]:
    dev = model_device(model)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    eos = tokenizer.eos_token_id
    formatted = [format_prompt(tokenizer, p) for p in prompts]
    lengths = [len(tokenizer(f, add_special_tokens=False)["input_ids"]) for f in formatted]
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    texts: list[str] = [""] * len(prompts)
    n_tokens, seconds = 0, 0.0
    try:
        if prompts:  # warm-up, untimed: the first call pays for allocator growth and kernel selection
            enc = tokenizer(formatted[order[0]], return_tensors="pt", add_special_tokens=False).to(dev)
            model.generate(**enc, max_new_tokens=2, do_sample=False, num_beams=1, use_cache=True,
                           pad_token_id=tokenizer.pad_token_id, eos_token_id=eos)
        for i in tqdm(range(0, len(order), batch_size), desc="generate", disable=not progress):
            idx = order[i : i + batch_size]
            enc = tokenizer([formatted[j] for j in idx], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(dev)
            t0 = time.perf_counter()
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=eos,
                                 cache=GrowingCache(model.config))
            seconds += time.perf_counter() - t0
            new = out[:, enc["input_ids"].shape[1]:]
            for j, row in zip(idx, new):
                row = row.tolist()
                k = row.index(eos) + 1 if eos in row else len(row)  # tokens actually generated
                n_tokens += k
                texts[j] = tokenizer.decode(row[:k], skip_special_tokens=True).strip()
    finally:
        tokenizer.padding_side = side
    return texts, n_tokens, seconds


@torch.no_grad()
def decode_speed(model, tokenizer, prompts: list[str], new_tokens: int = 64) -> dict[str, float]:
    """Batch-1 greedy decode of exactly ``new_tokens`` (EOS ignored) after each prompt.

    -> ``ttft_s`` (median seconds to the first token: prefill + one step) and
    ``decode_tokens_per_s`` (the tokens after the first / their time), the latency figures a
    single user of a deployed model sees; comparable with ``deploy.llamacpp.run``.
    """
    with contiguous_head(model):  # a peft model's frozen head: see contiguous_head
        return _decode_speed(model, tokenizer, prompts, new_tokens)


def _decode_speed(model, tokenizer, prompts: list[str], new_tokens: int) -> dict[str, float]:
    dev = model_device(model)
    ttft, dec_s, dec_n = [], 0.0, 0
    encs = [tokenizer(format_prompt(tokenizer, p), return_tensors="pt", add_special_tokens=False).to(dev)
            for p in prompts]
    if encs:  # warm-up, untimed
        model.generate(**encs[0], max_new_tokens=2, do_sample=False, pad_token_id=tokenizer.pad_token_id, use_cache=True)
    for enc in encs:
        t0 = time.perf_counter()
        out = model.generate(**enc, max_new_tokens=1, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             return_dict_in_generate=True, use_cache=True, cache=GrowingCache(model.config))
        t1 = time.perf_counter()
        model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       pad_token_id=tokenizer.pad_token_id, use_cache=True, cache=GrowingCache(model.config))
        t2 = time.perf_counter()
        ttft.append(t1 - t0)
        dec_s += (t2 - t1) - (t1 - t0)  # the full run minus its prefill + first token
        dec_n += new_tokens - 1
        del out
    return {"ttft_s": float(sorted(ttft)[len(ttft) // 2]) if ttft else math.nan,
            "decode_tokens_per_s": dec_n / dec_s if dec_s > 0 else math.nan}

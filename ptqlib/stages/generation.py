"""Greedy batched generation that does less work than ``model.generate``: the prompts' shared prefix once.

Every prompt of a task starts with the same chat-template header and instruction (64 of the ~200
tokens of a meetings-hard prompt for SmolLM2), and on a CPU the prefill of the prompts is most of
generation's time (58% of an evaluate stage's generation at the default study's shapes on an AMD
Zen 4, bf16, where the matmuls already run at the machine's bf16 rate). So :func:`greedy`

1. runs the longest prefix that all prompts share **once** (batch 1) and keeps its keys and values;
2. per chunk of ``batch_size`` prompts (sorted by length, so little padding), copies them into a fresh
   cache for every row and prefills only the rest of each prompt, laid out ``[prefix][padding][rest]``
   (the padding masked, the positions counted as if it were not there: ``prefix_len + i``);
3. decodes up to :data:`DECODE_ROWS` prompts as one batch (the chunks' caches side by side in one
   fixed-capacity buffer, :class:`FixedLayer`): a decode step's products read every weight once for
   all of them, at half the time per row of a 32-row batch;
4. decodes greedily with its own loop (no logits processors, no stopping criteria, only the last
   position's logits computed, decode attention as two matmuls: :func:`matmul_attention`), and drops
   the rows that have produced EOS from the batch once a quarter of it has (their cache rows with
   them), so a finished prompt costs nothing more.

The attention sees the same keys and values at the same positions as transformers' left-padded
``generate``, in another order of the masked padding: the same tokens unless two logits tie to within
rounding. fp32 gives ``model.generate``'s tokens on the tiny model and on SmolLM2's test prompts
(``tests/stages/test_generation.py``); bf16's share of identical outputs is in docs/precision.md.

Why not transformers: ``generate`` has no shared-prefix prefill and keeps finished rows to the end;
its prefix caching (``past_key_values`` passed in) needs one prompt per call. transformers' path stays
in :mod:`ptqlib.stages.hf_generation` (``evaluate.generation: generate``), beside the batch-1 latency.
"""
from __future__ import annotations

import contextlib
import time

import torch
from tqdm.auto import tqdm
from transformers.cache_utils import DynamicLayer

from ptqlib.stages.kv_cache import GrowingCache, GrowingLayer

ATTENTION = "ptqlib_matmul"
"""The attention implementation :func:`greedy` runs the model with on a CPU (:func:`matmul_attention`)."""


def model_device(model) -> torch.device:
    """The device of ``model``'s first parameter (where its inputs go)."""
    return next(p for p in model.parameters()).device


DECODE_ROWS = 128
"""Prompts decoded together: prefilled ``batch_size`` at a time (sorted by length, so little padding),
then decoded as one batch, whose products read each weight once for all rows. bf16, SmolLM2, 128 test
prompts of meetings-hard, 56 new tokens, AMD Zen 4, 2 threads: 2.8-3.4 ms per row and step at 32 rows,
2.0-2.4 at 64, 1.6-1.8 at 128. Its KV cache: 2 x layers x kv_heads x head_dim x slots x 2 bytes per row
(7 MB for SmolLM2 at 300 slots, 0.9 GB for 128 rows)."""
DECODE_KV_BYTES = 2 * 2**30
"""The most a decode batch's KV cache may hold (2 GiB): fewer rows than :data:`DECODE_ROWS` for a larger
model (a 7B Llama-2 at 300 slots takes 157 MB per row), never fewer than the prefill's ``batch_size``."""
DROP_SHARE = 0.25
"""Finished rows are dropped from the batch once this share of it has produced EOS: dropping copies
every layer's cache rows, so it is done in a few large steps, not one row at a time."""


def matmul_attention(module, query, key, value, attention_mask, scaling: float | None = None, dropout: float = 0.0,
                     **kwargs) -> tuple[torch.Tensor, None]:
    """Attention as two matmuls and a float32 softmax, the query heads that share a key head stacked as rows.

    ``query`` (b, heads, q, d), ``key`` / ``value`` (b, kv_heads, k, d), ``attention_mask`` boolean
    (b, 1, q, k) (True: attend) -> (b, q, heads, d). Only for a decode step (q = 1) on a CPU: there
    PyTorch's SDPA kernel, given a mask, took 0.7-0.9 ms per layer at batch 32 x 250 keys (bf16, SmolLM2,
    AMD Zen 4), these matmuls 0.35 ms. A prefill (q > 1) goes to SDPA, as transformers does: there the
    float32 scores and the mask's copies cost more than SDPA's kernel (6.3 vs 5.1 s per 32-prompt prefill).
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    b, h, q, d = query.shape
    kvh, k = key.shape[1], key.shape[2]
    if q > 1 or attention_mask is None or query.device.type != "cpu":
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    g = h // kvh  # query heads per key head, consecutive (transformers' repeat_kv order)
    scores = query.reshape(b, kvh, g * q, d) @ key.transpose(-1, -2)  # (b, kvh, g*q, k)
    scores = scores.float() * (scaling if scaling is not None else d ** -0.5)
    keep = attention_mask.expand(b, 1, q, k).unsqueeze(2).expand(b, 1, g, q, k).reshape(b, 1, g * q, k)
    probs = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1).to(value.dtype)
    out = (probs @ value).reshape(b, h, q, d)  # (b, kvh, g*q, d) -> (b, heads, q, d)
    return out.transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def decode_attention(model):
    """Run ``model`` with :func:`matmul_attention` where it computes with SDPA (restored on exit)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    before = getattr(base.config, "_attn_implementation", None)
    if before != "sdpa" or not hasattr(base, "set_attn_implementation"):
        yield
        return
    AttentionInterface.register(ATTENTION, matmul_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    base.set_attn_implementation(ATTENTION)
    try:
        yield
    finally:
        base.set_attn_implementation(before)


def _contiguous(module, args):
    return (args[0].contiguous(),) + tuple(args[1:])


@contextlib.contextmanager
def contiguous_head(model):
    """Hand ``model``'s output head (``get_output_embeddings()``) a contiguous input (removed on exit).

    With ``logits_to_keep=1`` the head gets the last position of the hidden states, a (b, 1, hidden)
    view with the whole prompt's batch stride. PyTorch 2.13's CPU ``linear`` folds such an input into
    one matmul only while the weight requires grad; by a frozen weight (every model peft wraps: QLoRA,
    DoRA, ...) it takes the batched path, in bf16 140x slower: Gemma 3's 262144 x 640 head on a batch of 4
    prompts 6.6 s vs 46 ms (SmolLM2's 49152 x 576 on 8: 0.90 s vs 9 ms; fp32 4x), once per prefill. It
    made a Gemma 3 QLoRA stage's generation 4-5x slower than its base's (199-233 s vs 44-51 s, 128 test
    prompts, 2-core AMD EPYC). The copy is b x hidden numbers, and the tokens stay the same: identical on
    the 128 test prompts of two Gemma 3 QLoRA stages (bf16) and of a SmolLM2 one (fp32).
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        yield
        return
    handle = head.register_forward_pre_hook(_contiguous)
    try:
        yield
    finally:
        handle.remove()


def shared_prefix(rows: list[list[int]]) -> int:
    """The length of the longest prefix all ``rows`` share, less one token of the shortest row: every
    prompt keeps at least one token of its own, whose logits give its first new token."""
    if not rows:
        return 0
    first, n = rows[0], min(len(r) for r in rows) - 1
    k = 0
    while k < n and all(r[k] == first[k] for r in rows):
        k += 1
    return max(k, 0)


def _prefix_fits(model, n: int) -> bool:
    """Whether a cache of ``n`` prefix tokens can be copied as is: every sliding-window layer keeps
    ``n`` tokens whole only while ``n`` is under its window."""
    window = getattr(model.config, "sliding_window", None)
    text_cfg = getattr(model.config, "text_config", None)
    window = window or getattr(text_cfg, "sliding_window", None)
    return window is None or n < window


@torch.no_grad()
def _prefix_cache(model, prefix: list[int], device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer the prefix's keys and values, each (1, kv_heads, len(prefix), head_dim)."""
    cache = GrowingCache(model.config)
    model(input_ids=torch.tensor([prefix], device=device), cache=cache, use_cache=True, logits_to_keep=1)
    return [(layer.keys, layer.values) for layer in cache.layers]


def _batch_cache(model, prefix_kv, rows: int) -> GrowingCache:
    """A fresh cache holding the prefix's keys and values for each of ``rows`` prompts."""
    cache = GrowingCache(model.config)
    for i, (k, v) in enumerate(prefix_kv):
        cache.update(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1), i)
    return cache


def rows_per_decode(model, slots: int, batch_size: int) -> int:
    """Rows decoded together: :data:`DECODE_ROWS`, or fewer where their KV cache of ``slots`` positions
    would pass :data:`DECODE_KV_BYTES`; at least ``batch_size``."""
    cfg = getattr(model.config, "text_config", None) or model.config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    width = next(p for p in model.parameters() if p.is_floating_point()).element_size()
    per_row = 2 * cfg.num_hidden_layers * kv_heads * head_dim * slots * width  # keys and values
    return max(batch_size, min(DECODE_ROWS, DECODE_KV_BYTES // per_row))


class FixedLayer(DynamicLayer):
    """A full-attention layer's cache for decoding: keys / values (rows, kv_heads, capacity, d) buffers of
    which the first ``n`` slots are filled, handed to the attention whole (the empty slots masked).

    A growing view ``buf[:, :, :n]`` (:class:`~ptqlib.stages.kv_cache.GrowingLayer`) has a batch stride that
    is not ``n * d``, and CPU ``bmm`` copies such an operand: the whole cache, every decode step (17 ms of a
    100 ms bf16 step at batch 32, SmolLM2, AMD Zen 4). A buffer of the final length is read in place.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, n: int):
        super().__init__()
        self.keys, self.values, self.n, self.is_initialized = keys, values, n, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        t = key_states.shape[-2]
        self.keys[:, :, self.n:self.n + t] = key_states
        self.values[:, :, self.n:self.n + t] = value_states
        self.n += t
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int, *args) -> tuple[int, int]:
        return self.keys.shape[-2], 0

    def get_seq_length(self) -> int:
        return self.n

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.keys, self.values = self.keys[indices], self.values[indices]


class _Prefilled:
    """A chunk of prompts after their prefill: prompt indices, cache, mask (rows, width), next positions
    (rows, 1) and each row's first new token (rows,)."""

    def __init__(self, model, idx: list[int], rests: list[list[int]], prefix_kv, n_prefix: int, pad_id: int,
                 device):
        b, s = len(idx), max(len(r) for r in rests)
        ids = torch.full((b, s), pad_id, dtype=torch.long)
        mask = torch.zeros(b, n_prefix + s, dtype=torch.long)
        mask[:, :n_prefix] = 1
        pos = torch.zeros(b, s, dtype=torch.long)
        for j, r in enumerate(rests):  # right-aligned: [prefix][padding][rest]
            ids[j, s - len(r):] = torch.tensor(r)
            mask[j, n_prefix + s - len(r):] = 1
            pos[j, s - len(r):] = torch.arange(n_prefix, n_prefix + len(r))
        self.idx = list(idx)
        self.mask, pos = mask.to(device), pos.to(device)
        self.cache = _batch_cache(model, prefix_kv, b) if prefix_kv else GrowingCache(model.config)
        self.first = _step(model, ids.to(device), pos, self.mask, self.cache)
        self.next_pos = pos[:, -1:] + 1


def _step(model, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor, cache) -> torch.Tensor:
    """One forward of ``ids`` (b, t) at positions ``pos`` (b, t) -> the greedy next token per row (b,)."""
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True,
                   logits_to_keep=1).logits  # (b, 1, vocab)
    return logits[:, -1].argmax(-1)


class _Batch:
    """Rows being decoded together: their prompt indices, cache, mask (rows, capacity), next positions."""

    def __init__(self, parts: list[_Prefilled], new_tokens: int):
        """One decode batch of ``parts``, each part's prompt slots right-aligned to the widest part's (the
        slots a part lacks are masked; positions are explicit, so a slot's place does not matter)."""
        width = max(p.mask.shape[1] for p in parts)
        rows = sum(len(p.idx) for p in parts)
        self.filled, self.capacity = width, width + new_tokens
        self.idx = [i for p in parts for i in p.idx]
        self.mask = parts[0].mask.new_zeros(rows, self.capacity)
        layers = []
        for li, layer in enumerate(parts[0].cache.layers):
            k0 = layer.keys
            k = k0.new_zeros(rows, k0.shape[1], self.capacity, k0.shape[-1])
            v = layer.values.new_zeros(rows, *layer.values.shape[1:2], self.capacity, layer.values.shape[-1])
            r = 0
            for p in parts:
                n, w = len(p.idx), p.mask.shape[1]
                k[r:r + n, :, width - w:width] = p.cache.layers[li].keys
                v[r:r + n, :, width - w:width] = p.cache.layers[li].values
                r += n
            layers.append(FixedLayer(k, v, width))
        r = 0
        for p in parts:
            n, w = len(p.idx), p.mask.shape[1]
            self.mask[r:r + n, width - w:width] = p.mask
            r += n
        self.cache = parts[0].cache
        self.cache.layers = layers
        self.next_pos = torch.cat([p.next_pos for p in parts])
        self.first = torch.cat([p.first for p in parts])
        self.out: dict[int, list[int]] = {i: [] for i in self.idx}

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (indices into the batch) of the cache, the mask and the positions."""
        self.cache.batch_select_indices(rows)
        self.mask, self.next_pos = self.mask[rows], self.next_pos[rows]
        self.idx = [self.idx[r] for r in rows.tolist()]


def _emit(nxt: torch.Tensor, live: torch.Tensor, idx: list[int], out: dict | list, eos_id: int | None) -> None:
    """Append each live row's token to its prompt's output; a row that produced EOS is live no more."""
    for j, tok in enumerate(nxt.tolist()):
        if live[j]:
            out[idx[j]].append(tok)
            live[j] = tok != eos_id


def _decode(model, batch: _Batch, max_new_tokens: int, eos_id: int | None) -> None:
    """Greedy decoding of ``batch`` from its first tokens into ``batch.out``, EOS included."""
    nxt = batch.first
    live = torch.ones(len(batch.idx), dtype=torch.bool)
    for t in range(max_new_tokens):
        _emit(nxt, live, batch.idx, batch.out, eos_id)
        if t == max_new_tokens - 1 or not live.any():
            return
        if (~live).sum() >= DROP_SHARE * len(live):  # drop the finished rows, their cache with them
            rows = live.nonzero().squeeze(1)
            batch.keep(rows.to(batch.mask.device))
            nxt, live = nxt[rows.to(nxt.device)], live[rows]
        batch.mask[:, batch.filled + t] = 1
        nxt = _step(model, nxt.unsqueeze(1), batch.next_pos, batch.mask, batch.cache)
        batch.next_pos = batch.next_pos + 1


def _decode_apart(model, part: _Prefilled, max_new_tokens: int, eos_id: int | None, out: list[list[int]]) -> None:
    """A chunk whose cache has layers other than full attention (sliding windows keep their own
    bookkeeping): decoded in its own cache, the mask growing a column per step."""
    nxt, mask, pos = part.first, part.mask, part.next_pos
    live = torch.ones(len(part.idx), dtype=torch.bool)
    for t in range(max_new_tokens):
        _emit(nxt, live, part.idx, out, eos_id)
        if t == max_new_tokens - 1 or not live.any():
            return
        mask = torch.cat([mask, mask.new_ones(len(part.idx), 1)], dim=1)
        nxt = _step(model, nxt.unsqueeze(1), pos, mask, part.cache)
        pos = pos + 1


def _decode_parts(model, parts: list[_Prefilled], max_new_tokens: int, eos_id: int | None,
                  out: list[list[int]]) -> None:
    """Decode prefilled chunks: as one :class:`_Batch` where every layer is plain full attention."""
    if not all(isinstance(layer, GrowingLayer) for layer in parts[0].cache.layers):
        for p in parts:
            _decode_apart(model, p, max_new_tokens, eos_id, out)
        return
    batch = _Batch(parts, max_new_tokens)
    _decode(model, batch, max_new_tokens, eos_id)
    for j, toks in batch.out.items():
        out[j] = toks


@torch.no_grad()
def greedy(model, prompts: list[list[int]], max_new_tokens: int, eos_id: int | None, pad_id: int,
           batch_size: int = 32, progress: bool = False, share_prefix: bool = True,
           decode_rows: int | None = None) -> tuple[list[list[int]], float]:
    """Greedy continuations of the token lists ``prompts`` -> (new tokens per prompt, EOS included when
    produced; seconds of the work, the shared prefix's forward included).

    At most ``max_new_tokens`` per prompt. Prompts sorted by length are prefilled ``batch_size`` at a
    time (little padding) and decoded :func:`rows_per_decode` (``decode_rows``) at a time (larger products);
    the outputs come back in the given order. ``share_prefix=False`` prefills every prompt whole.
    """
    dev = model_device(model)
    n_prefix = shared_prefix(prompts) if share_prefix and len(prompts) > 1 else 0
    if n_prefix and not _prefix_fits(model, n_prefix):
        n_prefix = 0
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    rows = decode_rows or rows_per_decode(model, max(map(len, prompts), default=0) + max_new_tokens, batch_size)
    out: list[list[int]] = [[] for _ in prompts]
    t0 = time.perf_counter()
    with decode_attention(model), contiguous_head(model), tqdm(total=len(order), desc="generate",
                                                                  disable=not progress) as bar:
        prefix_kv = _prefix_cache(model, prompts[0][:n_prefix], dev) if n_prefix else None
        for g in range(0, len(order), rows):
            group = order[g : g + rows]
            parts = [_Prefilled(model, group[i : i + batch_size], [prompts[j][n_prefix:] for j in group[i : i + batch_size]],
                                prefix_kv, n_prefix, pad_id, dev) for i in range(0, len(group), batch_size)]
            _decode_parts(model, parts, max_new_tokens, eos_id, out)
            bar.update(len(group))
    return out, time.perf_counter() - t0

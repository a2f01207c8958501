"""A KV cache for greedy generation on CPU that appends in place instead of concatenating.

transformers' ``DynamicLayer.update`` is ``keys = torch.cat([keys, new], dim=-2)``: every decode step
copies the layer's whole cache, so a generation of T tokens moves O(T^2) bytes. In an evaluate stage of
the default study (32 prompts of ~200 tokens, 56 new tokens, bf16) that ``cat`` was 12% of generation's
time on an AMD Zen 4 and 20% on an Intel CPU with AMX, where the matmuls are faster
(``bench/stage_speed.py --profile``, docs/precision.md).

:class:`GrowingCache` keeps each layer's keys and values in a buffer with room to spare (twice what it
holds when it grows) and hands the attention the views ``buf[:, :, :n]``: O(T) bytes per generation.
The attention receives the same values in the same shapes (transformers' SDPA path makes them
contiguous before the kernel when there is a padding mask), so greedy outputs are the same tokens, bit
for bit (``tests/stages/test_kv_cache.py``). transformers' own ``StaticCache`` removes the copy too, but
attends over all ``max_cache_len`` positions under a mask: other reductions, other tokens (332 of
32 x 56 on the study's prompts), which is why it is not used.

Why not upstream: transformers has no growable-buffer layer; its cache classes are the extension point
(``Cache(layers=...)``), and this is one ``DynamicLayer.update`` override.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer


class GrowingLayer(DynamicLayer):
    """``DynamicLayer`` whose ``keys`` / ``values`` (b, heads, n, d) are views of a larger buffer."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._kbuf: torch.Tensor | None = None  # (b, heads, capacity, d)
        self._vbuf: torch.Tensor | None = None

    def _ours(self) -> bool:
        """Whether ``self.keys`` is still the view handed out (``crop``, ``reset``, beam reordering
        and the like replace it, and the buffer is then re-seeded from what they left)."""
        return (self._kbuf is not None and self.keys is not None and self.keys.numel() > 0
                and self.keys.data_ptr() == self._kbuf.data_ptr() and self.keys.shape[:2] == self._kbuf.shape[:2])

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        old_k, old_v = (self.keys, self.values) if self.keys.numel() else (None, None)
        n = 0 if old_k is None else old_k.shape[-2]
        t = key_states.shape[-2]
        if not self._ours() or n + t > self._kbuf.shape[-2]:  # (re)allocate with room, keep what is held
            cap = 2 * (n + t)
            self._kbuf = key_states.new_empty(*key_states.shape[:-2], cap, key_states.shape[-1])
            self._vbuf = value_states.new_empty(*value_states.shape[:-2], cap, value_states.shape[-1])
            if n:
                self._kbuf[:, :, :n].copy_(old_k)
                self._vbuf[:, :, :n].copy_(old_v)
        self._kbuf[:, :, n:n + t].copy_(key_states)
        self._vbuf[:, :, n:n + t].copy_(value_states)
        self.keys, self.values = self._kbuf[:, :, :n + t], self._vbuf[:, :, :n + t]
        return self.keys, self.values

    def reset(self) -> None:
        self._kbuf = self._vbuf = None
        super().reset()


class GrowingCache(DynamicCache):
    """``DynamicCache(config=...)`` with :class:`GrowingLayer` for every full-attention layer.

    Sliding-window and other special layers keep transformers' own classes. Pass a fresh one per
    ``generate`` call: ``model.generate(..., cache=GrowingCache(model.config))``.
    """

    def __init__(self, config=None):
        super().__init__(config=config)
        if self.layer_class_to_replicate is DynamicLayer:  # no config: layers are made on first use
            self.layer_class_to_replicate = GrowingLayer
        self.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in self.layers]

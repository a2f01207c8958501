"""Tiny randomly initialised models: tests and the smoke study run on them in seconds.

``tiny`` is Llama-style; ``tiny-gemma3`` is Gemma 3's text architecture (grouped-query attention with
QK-norm, sliding-window and global layers, a scaled embedding, sandwich norms): a second model family at
the same sizes, so the methods are tested on both. Sizes are chosen so every group size in {32, 64, 128}
and pool / repeat factors of 2, 4 and 8 divide every linear layer's input and output size, which lets one
model exercise every quantizer and adapter.
"""
from __future__ import annotations

import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

TINY_VOCAB = 1024  # the tiny BPE tokenizer (ptqlib.models) has exactly this many tokens


def tiny_config(vocab_size: int = TINY_VOCAB) -> LlamaConfig:
    """hidden 128, 4 heads of 32 (2 KV heads), MLP 256, 2 layers, tied embeddings."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def tiny_gemma3_config(vocab_size: int = TINY_VOCAB) -> Gemma3TextConfig:
    """Gemma 3's text architecture at ``tiny``'s sizes: hidden 128, 4 heads of 32 (2 KV heads), MLP 256,
    one sliding-window layer (window 64) and one global layer, tied embeddings."""
    return Gemma3TextConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=32, max_position_embeddings=1024,
        sliding_window=64, layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )


ARCHS = {"llama": (tiny_config, LlamaForCausalLM), "gemma3": (tiny_gemma3_config, Gemma3ForCausalLM)}


def build_tiny_model(seed: int = 0, vocab_size: int = TINY_VOCAB, arch: str = "llama"):
    """A deterministic fp32 tiny model of ``arch`` (llama, gemma3; same seed -> same weights)."""
    config, cls = ARCHS[arch]
    torch.manual_seed(seed)
    model = cls(config(vocab_size))
    model.eval()
    return model

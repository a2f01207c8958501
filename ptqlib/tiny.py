"""A tiny randomly initialised Llama-style model: tests and the smoke study run on it in seconds.

Sizes are chosen so every group size in {32, 64, 128} and pool / repeat factors of 2, 4 and 8
divide every linear layer's input and output size, which lets one model exercise every
quantizer and adapter.
"""
from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

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


def build_tiny_model(seed: int = 0, vocab_size: int = TINY_VOCAB) -> LlamaForCausalLM:
    """A deterministic fp32 tiny model (same seed -> same weights)."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(vocab_size))
    model.eval()
    return model

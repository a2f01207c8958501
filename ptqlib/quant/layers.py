"""Locating the decoder layers and their linear sub-layers in a Hugging Face causal LM."""
from __future__ import annotations

from torch import nn


def get_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(prefix, layers)`` of the decoder stack, e.g. ``("model.layers", ModuleList)``.

    Takes the ``nn.ModuleList`` whose length is ``config.num_hidden_layers`` (Llama, Qwen2,
    Mistral: ``model.layers``); without a config, the longest ModuleList.
    """
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    best: tuple[str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if n is not None and len(mod) == n:
            return name, mod
        if best is None or len(mod) > len(best[1]):
            best = (name, mod)
    if best is None:
        raise ValueError("no decoder layer stack (nn.ModuleList) found in the model")
    return best


def find_linear_layers(
    module: nn.Module, types: tuple[type, ...] = (nn.Linear,), prefix: str | None = None
) -> dict[str, nn.Module]:
    """``name -> module`` for the linears inside the decoder layers (never ``lm_head``/embeddings).

    Given a whole model, names are full paths (``model.layers.0.self_attn.q_proj``). Given a
    single decoder layer (``prefix`` optional), names are relative to it (``self_attn.q_proj``).
    """
    if getattr(getattr(module, "config", None), "num_hidden_layers", None) is not None:
        try:  # a whole model: walk its decoder stack only
            stack_name, stack = get_decoder_layers(module)
            return {
                f"{stack_name}.{i}.{n}": m
                for i, layer in enumerate(stack)
                for n, m in layer.named_modules()
                if isinstance(m, types)
            }
        except ValueError:
            pass
    pre = f"{prefix}." if prefix else ""
    return {pre + n: m for n, m in module.named_modules() if n and isinstance(m, types)}


def set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted path ``name`` by ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)

"""Swapping a model's decoder linears for trainable quantized layers and back (L4Q and QAT-LoRA share it):
which layers (:func:`decoder_linear_names`), the swap (:func:`wrap_linears`), freezing the rest, and
the export of each layer to its ``QuantLinear`` (:func:`export_layers`)."""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import nn

from ptqlib.quant.layers import set_module


def decoder_linear_names(model: nn.Module, target_modules: Sequence[str] | None = None,
                         types: tuple[type, ...] = (nn.Linear,)) -> list[str]:
    """Qualified names of ``types`` layers inside the decoder layers (never lm_head/embeddings).

    ``target_modules`` filters peft-style by the last name component (``["q_proj", "v_proj"]``)
    or by a dotted suffix of the full name; ``None`` keeps every linear of the decoder layers.
    """
    from ptqlib.quant.layers import find_linear_layers  # lazy: the layer itself needs no ptqlib.quant

    names = list(find_linear_layers(model, types))
    if target_modules is not None:
        names = [n for n in names
                 if any(n == t or n.endswith("." + t) for t in target_modules)]
    return names


def freeze_all_but(model: nn.Module, trainable: Iterable[nn.Parameter]) -> None:
    """Set ``requires_grad`` False everywhere except the given parameters."""
    keep = {id(p) for p in trainable}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)


def wrap_linears(model: nn.Module, layer_cls: type, target_modules: Sequence[str] | None, **kw) -> nn.Module:
    """Replace decoder-layer ``nn.Linear`` by ``layer_cls(linear, **kw)`` in place and freeze
    everything except each new layer's ``A, B, S, b`` (shared by L4Q and QAT-LoRA)."""

    names = decoder_linear_names(model, target_modules)
    if not names:
        raise ValueError(f"{layer_cls.__name__}: no target nn.Linear found inside decoder layers")
    trainable = []
    for name in names:
        layer = layer_cls(model.get_submodule(name), **kw)
        set_module(model, name, layer)
        trainable += [layer.lora_A, layer.lora_B, layer.q_scale, layer.q_offset]
    freeze_all_but(model, trainable)
    return model


@torch.no_grad()
def export_layers(model: nn.Module, layer_cls: type) -> nn.Module:
    """Every ``layer_cls`` module -> its ``.export()``, in place."""

    for name in [n for n, m in model.named_modules() if isinstance(m, layer_cls)]:
        set_module(model, name, model.get_submodule(name).export())
    return model

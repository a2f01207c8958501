"""Balanced adapters at model level: wrap a quantized model's linears, merge QA-* into its
low-bit layers, save and load (the adapter maths: ``ptqlib/adapters/balanced.py``; the zero-point
fold: ``QuantLinear.fold_group_offset``). See ``docs/methods.md``, section Q-BLoRA.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch
import torch.nn as nn
from torch import Tensor

from ptqlib.adapters.balanced import KINDS, Kind, QBLoRALinear
from ptqlib.adapters.io import load_adapter, save_adapter
from ptqlib.quant.layers import find_linear_layers, set_module
from ptqlib.quant.qlinear import QuantLinear

_FORMAT = "ptqlib-blora-v1"


# --------------------------------------------------------------------------------------------
# model level
# --------------------------------------------------------------------------------------------
def target_layers(
    model: nn.Module, target_modules: Iterable[str] | None = None, types: tuple[type, ...] | None = None
) -> dict[str, nn.Module]:
    """``name -> layer`` to adapt: the decoder-layer linears (``ptqlib.quant.find_linear_layers``,
    the same set RTN/GPTQ quantize: never ``lm_head`` or embeddings), optionally restricted to
    names ending in one of ``target_modules`` (``["q_proj", "v_proj"]``)."""
    types = types or (nn.Linear, QuantLinear)  # bnb Linear4bit is an nn.Linear subclass
    found = find_linear_layers(model, types=types)
    if target_modules is not None:
        targets = list(target_modules)
        found = {n: m for n, m in found.items() if any(n == t or n.endswith("." + t) for t in targets)}
    return found


def adapter_layers(model: nn.Module) -> dict[str, QBLoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QBLoRALinear)}


def apply_adapter(
    model: nn.Module,
    kind: Kind,
    rank: int,
    alpha: float,
    pool: int | None = None,
    repeat: int | None = None,
    target_modules: Iterable[str] | None = None,
    *,
    dropout: float = 0.0,
    pool_norm: str = "mean",
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Wrap linear layers with ``QBLoRALinear`` in place and freeze everything else.

    ``target_modules``: name suffixes (``["q_proj", "v_proj"]``); default: every QuantLinear /
    Linear4bit / nn.Linear inside the decoder layers (not ``lm_head``, not embeddings).
    ``pool``/``repeat`` default per kind (see ``default_factors``); for qalora/qablora the pool
    is each layer's own quantization group size; ``pool_norm`` averages (``"mean"``, the official
    code) or sums (``"sum"``, QA-LoRA's Algorithm 1) each pooled block. Returns the model.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown adapter kind {kind!r}; valid: {', '.join(KINDS)}")
    if adapter_layers(model):
        raise ValueError("model already has balanced adapters; load into it or start from a fresh base")
    targets = list(target_modules) if target_modules is not None else None
    names = list(target_layers(model, targets))
    if not names:
        raise ValueError(f"no target linear layers found (target_modules={targets})")
    for p in model.parameters():
        p.requires_grad_(False)
    layers = {}
    for n in names:
        wrapped = QBLoRALinear.for_kind(
            model.get_submodule(n), kind, rank, alpha, pool, repeat, dropout=dropout, pool_norm=pool_norm, name=n,
            dtype=dtype,
        )
        set_module(model, n, wrapped)
        a = wrapped.adapter
        layers[n] = {"pool": a.pool, "repeat": a.repeat, "rank_eff": a.rank_eff, "match_params": a.match_params}
    model.ptqlib_adapter_config = {
        "format": _FORMAT, "kind": kind, "rank": rank, "alpha": float(alpha), "pool": pool, "repeat": repeat,
        "target_modules": targets, "dropout": dropout, "pool_norm": pool_norm, "dtype": str(dtype).removeprefix("torch."),
        "layers": layers,
    }
    return model


def merge_adapters(model: nn.Module) -> nn.Module:
    """Replace every QA-LoRA / QA-BLoRA wrapper by its merged QuantLinear (float zeros), in place.

    Q-BLoRA raises (no exact low-bit merge). The model keeps its low-bit size; its
    ``ptqlib_adapter_config`` is removed since no adapter is left.
    """
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("model has no QBLoRALinear layers to merge")
    merged = {n: m.merge() for n, m in layers.items()}  # all or nothing: errors before any swap
    for n, m in merged.items():
        set_module(model, n, m)
    if hasattr(model, "ptqlib_adapter_config"):
        del model.ptqlib_adapter_config
    return model


def count_trainable(model: nn.Module) -> int:
    """Number of parameters with ``requires_grad``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_param_count(in_features: int, out_features: int, rank: int) -> int:
    """LoRA-r's parameter count ``r (in + out)`` (the budget the balanced adapters match)."""
    return rank * (in_features + out_features)


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``{"<layer>.lora_A": (r', in/p), "<layer>.lora_B": (out/k, r')}`` for every wrapper."""
    sd = {}
    for n, m in adapter_layers(model).items():
        sd[f"{n}.lora_A"] = m.adapter.lora_A.detach().contiguous()
        sd[f"{n}.lora_B"] = m.adapter.lora_B.detach().contiguous()
    return sd


def save_adapters(model: nn.Module, path: str | Path) -> Path:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` to the directory ``path``."""
    cfg = getattr(model, "ptqlib_adapter_config", None)
    if cfg is None or not adapter_layers(model):
        raise ValueError("model has no adapters applied by ptqlib.adapters.blora.apply_adapter")
    return save_adapter(path, adapter_state_dict(model), cfg)


def load_adapters(model: nn.Module, path: str | Path) -> nn.Module:
    """Load adapters saved by ``save_adapters``; wraps the model first if it has none.

    The model must be the same architecture and base as at save time (same layer names,
    sizes and group sizes); mismatches raise with the layer named.
    """
    sd, cfg = load_adapter(path)
    if cfg.get("format") != _FORMAT:
        raise ValueError(f"{Path(path)}: not a ptqlib balanced-adapter config (format {cfg.get('format')!r})")
    if not adapter_layers(model):
        apply_adapter(
            model, cfg["kind"], cfg["rank"], cfg["alpha"], cfg["pool"], cfg["repeat"], cfg["target_modules"],
            dropout=cfg.get("dropout", 0.0), pool_norm=cfg.get("pool_norm", "mean"),  # saved before pool_norm: mean
            dtype=getattr(torch, cfg.get("dtype", "float32")),
        )
    layers = adapter_layers(model)
    if set(layers) != set(cfg["layers"]):
        missing, extra = set(cfg["layers"]) - set(layers), set(layers) - set(cfg["layers"])
        raise ValueError(f"adapter layers differ from {path}: missing in model {sorted(missing)}, extra {sorted(extra)}")
    for n, m in layers.items():
        a, want = m.adapter, cfg["layers"][n]
        got = {"pool": a.pool, "repeat": a.repeat, "rank_eff": a.rank_eff, "match_params": a.match_params}
        if got != want:
            raise ValueError(f"layer {n!r}: adapter shape {got} differs from the saved {want}")
        if a.pool_norm != cfg.get("pool_norm", "mean"):
            raise ValueError(f"layer {n!r}: adapter pool_norm {a.pool_norm!r} differs from the saved "
                             f"{cfg.get('pool_norm', 'mean')!r} (its scale would be off by the pool factor)")
        with torch.no_grad():
            a.lora_A.copy_(sd[f"{n}.lora_A"])
            a.lora_B.copy_(sd[f"{n}.lora_B"])
    model.ptqlib_adapter_config = cfg
    return model

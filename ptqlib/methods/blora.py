"""Q-BLoRA and QA-BLoRA (and QA-LoRA): balanced low-rank adapters on a frozen quantized base
(``ptqlib/adapters/blora.py``: pooled input, repeated output, higher rank at equal parameters).

``qblora`` keeps its adapter beside any quantized base; ``qalora`` / ``qablora`` pool over the
base's quantization groups, which is what lets them merge into its zero points exactly: their output
is the input's uniform grid with the adapter folded in (still low-bit).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ptqlib.errors import ConfigError, check_choice
from ptqlib.methods import ArtifactType, FinetuneMethod, Options, StageSettings, register
from ptqlib.quant.grid import POOL_NORMS


@dataclass
class BalancedOptions(Options):
    pool: int = 0  # qblora/qablora: input pool factor (0: the method's default)
    repeat: int = 0  # qblora/qablora: output repeat factor (0: the method's default)
    pool_norm: str = "mean"  # qblora/qalora/qablora: reduce a pooled block by its mean (official code) or sum (QA-LoRA's Algorithm 1; the mean at alpha x pool)

    def __post_init__(self) -> None:
        for k in ("pool", "repeat"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"{k}: {v!r} must be 0 (the method's default) or a positive integer")
        check_choice("pool_norm", self.pool_norm, POOL_NORMS)


@dataclass
class MergedBalancedOptions(BalancedOptions):
    """qalora / qablora pool over the base's quantization groups."""

    group_size: int = 0  # qalora/qablora: as the quantized base (0: take it from the base; another value is an error)

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < -1:
            raise ConfigError(f"group_size: {self.group_size!r} must be 0 (the base's group) or the base's group size")


def prepare(model, p: StageSettings, input_ref: str):
    from ptqlib.adapters.blora import apply_adapter

    method = p.method
    model = apply_adapter(model, method, rank=p.rank, alpha=p.alpha, pool=p.pool or None,
                          repeat=p.repeat or None, target_modules=list(p.target_modules), pool_norm=p.pool_norm)
    if method in ("qalora", "qablora") and p.group_size > 0:  # validated against the study; checked here
        layers = model.ptqlib_adapter_config["layers"]
        bad = {n: l["pool"] for n, l in layers.items() if l["pool"] != p.group_size}
        if bad:
            raise ValueError(f"group_size {p.group_size} differs from the base's quantization group in "
                             + ", ".join(f"{n} ({g})" for n, g in list(bad.items())[:3]))
    if getattr(model, "is_quantized", False):
        # transformers' Trainer refuses a bnb-quantized model unless it knows adapters are
        # attached; this flag is how its own adapter integration says so
        model._hf_peft_config_loaded = True
    return model


def save(model, tokenizer, p: StageSettings, output_dir, input_ref: str) -> dict:
    from ptqlib import artifacts
    from ptqlib.adapters import blora

    out = Path(output_dir)
    blora.save_adapters(model, out / "adapter")
    if p.method == "qblora":
        return {"type": "blora", "adapter": "adapter", "base": artifacts.base_ref(out, input_ref)}
    from ptqlib.quant.checkpoint import save_quantized

    blora.merge_adapters(model)
    save_quantized(model, out / "model", tokenizer=tokenizer)
    return {"type": "quant", "path": "model", "merged_from": "adapter"}


def load(ref, info: dict, device: str):
    from ptqlib import artifacts
    from ptqlib.adapters import blora

    base, tok, _ = artifacts.load(artifacts.base_of(ref, info), device)
    return blora.load_adapters(base, Path(ref) / info["adapter"]), tok


_QA = ("group_size", "lr", "steps", "rank", "alpha", "pool_norm")
register(
    FinetuneMethod("qblora", "balanced LoRA (pooled input, repeated output) on a quantized base", needs="quantized",
                   gives="adapter", prepare=prepare, save=save,
                   settings=("lr", "steps", "rank", "alpha", "pool", "repeat", "pool_norm"), label_keys=("pool_norm",),
                   options=BalancedOptions),
    FinetuneMethod("qalora", "QA-LoRA: input pooled over the base's groups, merged into its zero points",
                   needs="uniform", gives="merged", prepare=prepare, save=save, settings=_QA,
                   label_keys=("group_size", "pool_norm"), group="base", options=MergedBalancedOptions),
    FinetuneMethod("qablora", "QA-BLoRA: balanced and pooled over the base's groups, merged into its zero points",
                   needs="uniform", gives="merged", prepare=prepare, save=save, settings=_QA,
                   label_keys=("group_size", "pool_norm"), group="base", options=MergedBalancedOptions),
    ArtifactType("blora", load, quantized="base"),
)

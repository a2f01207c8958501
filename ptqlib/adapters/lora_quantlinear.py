"""peft LoRA on ``QuantLinear``: QLoRA on a GPTQ / RTN base.

peft only knows its own quantized backends (bnb, GPTQModel, AWQ, ...). Its experimental
custom-module registration (``LoraConfig._register_custom_module``) lets ``get_peft_model``
wrap any layer type; this module registers ``QuantLinear -> LoraQuantLinear``.

``y = QuantLinear(x) + s * B(A(dropout(x)))`` with ``s = alpha / r`` (rsLoRA: ``alpha / sqrt(r)``):
the frozen packed codes are dequantized in the forward, only ``A``, ``B`` train. ``A``/``B``
stay in float32 (peft sees the int32 ``qweight`` and does not cast them to the base dtype),
the input is cast to their dtype and the sum back to the base output's dtype.

Merging is not supported: ``W_hat + s B A`` is not on the quantization grid, so folding the
adapter in would either dequantize the model or change it. The deployable artifact is the
quantized base (``save_quantized``) plus the adapter (``PeftModel.save_pretrained``). QA-LoRA /
QA-BLoRA adapters, which are constant over quantization groups, merge into float zero points
(``QuantLinear.set_float_zeros``) instead.

Usage::

    from peft import get_peft_model
    from ptqlib.adapters.lora_quantlinear import lora_config
    model = get_peft_model(quantized_model, lora_config(r=16, lora_alpha=32, target_modules=[...]))
"""
from __future__ import annotations

from typing import Any

import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora.layer import LoraLayer
from torch import Tensor, nn

from ..quant.qlinear import QuantLinear

MERGE_ERROR = (
    "Merging a LoRA adapter into a QuantLinear is not supported: W_hat + s*B@A is off the "
    "quantization grid. Keep the adapter separate (save it with PeftModel.save_pretrained and "
    "the base with ptqlib.quant.save_quantized), or use a group-constant adapter (QA-LoRA / "
    "QA-BLoRA) that merges into float zero points."
)


class LoraQuantLinear(nn.Module, LoraLayer):
    """LoRA layer wrapping a frozen ``QuantLinear`` (peft custom module)."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: LoraConfig,
        r: int = 0,
        lora_alpha: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        if config.use_dora:
            raise ValueError("DoRA needs a float base weight; not supported on QuantLinear")
        if getattr(config, "velora_config", None) is not None:
            raise ValueError("VeLoRA is not supported on QuantLinear")
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        return base.in_features, base.out_features

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        result = self.base_layer(x)  # (..., out) in x's dtype
        if self.disable_adapters:
            return result
        out_dtype = result.dtype
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            lora_A, lora_B = self.lora_A[name], self.lora_B[name]
            dropout = self.lora_dropout[name]
            if isinstance(dropout, nn.Identity) and torch.is_autocast_enabled(x.device.type):
                xa = x  # autocast casts it for lora_A anyway: a float32 copy first would change nothing
            else:
                xa = self._cast_input_dtype(x, lora_A.weight.dtype)
            result = result + lora_B(lora_A(dropout(xa))) * self.scaling[name]
        return result.to(out_dtype)

    def get_delta_weight(self, adapter: str) -> Tensor:
        """``s * B @ A``: ``(out, in)`` float, for analysis and for group-constant merges."""
        return (self.lora_B[adapter].weight @ self.lora_A[adapter].weight) * self.scaling[adapter]

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise NotImplementedError(MERGE_ERROR)

    def unmerge(self) -> None:
        raise NotImplementedError(MERGE_ERROR)

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def register(config: LoraConfig) -> LoraConfig:
    """Teach ``config`` to wrap ``QuantLinear`` with ``LoraQuantLinear``; returns it."""
    config._register_custom_module({QuantLinear: LoraQuantLinear})
    return config


def lora_config(**kwargs: Any) -> LoraConfig:
    """``LoraConfig(**kwargs)`` registered for ``QuantLinear`` (``task_type`` defaults to CAUSAL_LM)."""
    kwargs.setdefault("task_type", "CAUSAL_LM")
    return register(LoraConfig(**kwargs))


def load_adapter(model: nn.Module, adapter_dir: str, is_trainable: bool = False, **kwargs: Any) -> PeftModel:
    """``PeftModel.from_pretrained`` for a quantized base (the saved config lacks the registration)."""
    config = register(LoraConfig.from_pretrained(adapter_dir))
    return PeftModel.from_pretrained(model, adapter_dir, config=config, is_trainable=is_trainable, **kwargs)


def lora_parameters(model: nn.Module) -> list[torch.nn.Parameter]:
    """The trainable LoRA parameters of a peft model (for an optimizer)."""
    return [p for n, p in model.named_parameters() if "lora_" in n and p.requires_grad]

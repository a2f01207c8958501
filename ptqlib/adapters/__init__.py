"""Adapters on quantized bases: LoRA on ``QuantLinear`` (peft backend), L4Q, Q-BLoRA / QA-BLoRA.

Submodules are imported explicitly (``from ptqlib.adapters.lora_quantlinear import lora_config``)
so that importing one adapter never pulls in the others.
"""

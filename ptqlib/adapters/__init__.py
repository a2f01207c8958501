"""Adapters on quantized bases: LoRA on ``QuantLinear`` (peft backend), L4Q, Q-BLoRA / QA-BLoRA.

Submodules are imported explicitly (``from ptqlib.adapters.lora_quantlinear import lora_config``)
so that importing one adapter never pulls in the others.
"""

QUANTIZER_KERNELS = ("auto", "compiled", "eager")
"""How L4Q / QAT-LoRA's learnable quantizer runs its element-wise work (``ptqlib.adapters.quantizer_kernels``):
``auto`` compiled where a compiler works, else eager (one warning); ``compiled`` an error where none works;
``eager`` PyTorch's ops one by one. The same numbers every way. Here, torch-free, for the study schema."""

"""EoRA as a method (``ptqlib.adapters.eora`` has the maths): on a ``QuantLinear`` base (RTN, GPTQ, AWQ,
AutoRound, HQQ), every LoRA pair starts at the rank-r correction of the layer's quantization error in the
eigenspace of its calibration inputs, computed from the float weights the base was quantized from.
With ``steps: 0`` that is EoRA, training-free; with steps it is the start QLoRA then trains from (as LoftQ's is).
``cloq`` is that start with the factors split evenly (CLoQ's calibrated initialisation, ``adapters.eora``) and
trains, its steps those of any finetune stage.

The calibration inputs are those of the float model (the quantize stage's input) on ``eora_samples``
windows of pydoc's train text, the windows drawn from the stage's seeded stream (``ptqlib.seeding``), so
each pipeline seed is its own calibration draw, as GPTQ's is.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

from ptqlib.errors import check_positive
from ptqlib.methods import FinetuneMethod, StageSettings, lora, register


@dataclass
class EoRAOptions(lora.MergeOptions):
    eora_samples: int = 32  # eora: calibration windows (pydoc train text) whose inputs weigh the quantization error
    eora_seq_len: int = 256  # eora: tokens per calibration window

    def __post_init__(self) -> None:
        check_positive("eora_samples", self.eora_samples)
        check_positive("eora_seq_len", self.eora_seq_len)


def eora_initialise(peft_model, float_ref: str, windows, adapter: str = "default", batch: int = 8,
                    split: str = "eora") -> dict:
    """Set every ``QuantLinear`` LoRA pair of ``peft_model`` to EoRA's correction (``split``: see
    ``adapters.eora.eora_factors``), in place -> ``{layer: (output error of Q, of Q + s B A)}``, each relative to
    the float layer's output energy over the windows."""
    import torch

    from ptqlib import artifacts
    from ptqlib.adapters.eora import InputMoments, eigenbasis, eora_factors, output_error
    from ptqlib.adapters.lora_quantlinear import LoraQuantLinear

    prefix = "base_model.model."
    layers = {n.removeprefix(prefix): m for n, m in peft_model.named_modules()
              if isinstance(m, LoraQuantLinear) and adapter in m.lora_A}
    if not layers:
        raise ValueError("eora found no QuantLinear LoRA layer: its input must be a uniform grid (rtn, gptq, ...)")
    fmodel = artifacts.load(float_ref, "cpu")[0].float().eval()
    moments = InputMoments(fmodel, list(layers))
    with torch.no_grad():
        for i in range(0, len(windows), batch):
            fmodel(windows[i:i + batch])
    H = moments.close()
    fmods = dict(fmodel.named_modules())
    bases: dict[int, tuple] = {}  # one eigendecomposition per distinct H (layers that share their input share it)
    errors = {}
    with torch.no_grad():
        for name, mod in layers.items():
            W = fmods[name].weight.float()  # (out, in)
            Q = mod.get_base_layer().dequantize_weight(torch.float32).cpu()
            s, r = mod.scaling[adapter], mod.r[adapter]
            if id(H[name]) not in bases:
                bases[id(H[name])] = eigenbasis(H[name])
            basis = bases[id(H[name])]
            A, B = eora_factors(W - Q, H[name], r, s, basis=basis, split=split)
            a, b = mod.lora_A[adapter].weight, mod.lora_B[adapter].weight
            a.copy_(A.to(a.device, a.dtype))
            b.copy_(B.to(b.device, b.dtype))
            energy = output_error(W, H[name])
            errors[name] = (output_error(W - Q, H[name]) / energy, output_error(W - Q - s * B @ A, H[name]) / energy)
    return errors


def prepare(model, p: StageSettings, input_ref: str | None, split: str = "eora"):
    import torch

    from ptqlib import artifacts
    from ptqlib.models import load_tokenizer
    from ptqlib.text import text_windows

    if input_ref is None:
        raise ValueError("eora needs input_ref (the quantize stage it corrects) to find the float weights")
    float_ref = artifacts.input_of(input_ref)
    window_seed = int(torch.randint(0, 2**31 - 1, (1,)))  # the stage's seeded stream (finetune.prepare seeds it)
    tok = load_tokenizer(artifacts.float_model_dir(float_ref))
    windows = text_windows(tok, "train", p.eora_seq_len, p.eora_samples, seed=window_seed)
    model = lora.prepare(model, p, input_ref)  # LoRA pairs on the QuantLinear base
    errors = eora_initialise(model, float_ref, windows, split=split)
    before = sum(e[0] for e in errors.values()) / len(errors)
    after = sum(e[1] for e in errors.values()) / len(errors)
    print(f"{'EoRA' if split == 'eora' else 'CLoQ start'} on {len(errors)} layers (rank {p.rank}, {p.eora_samples} x {p.eora_seq_len} calibration tokens): "
          f"mean relative output error {before:.3g} -> {after:.3g}")
    return model


register(FinetuneMethod("eora", "EoRA: the quantization error's rank-r correction in the eigenspace of the "
                                "calibration inputs (training-free with steps: 0)", needs="uniform", gives="adapter",
                        prepare=prepare, save=lora.save, settings=("steps", "rank", "alpha", "eora_samples"),
                        can_merge=True, options=EoRAOptions,
                        why_needs="; EoRA corrects a QuantLinear grid from its de-quantized weights (rtn, gptq, awq, "
                                  "autoround, hqq); on nf4 / fp4 use loftq, the same idea without the inputs"))
register(FinetuneMethod("cloq", "CLoQ: QLoRA from the calibrated closed-form start (EoRA's correction, its factors "
                                "split evenly), then trained", needs="uniform", gives="adapter",
                        prepare=functools.partial(prepare, split="even"), save=lora.save,
                        settings=("steps", "rank", "alpha", "lr", "eora_samples"), can_merge=True, options=EoRAOptions,
                        why_needs="; CLoQ calibrates a QuantLinear grid from its de-quantized weights (rtn, gptq, awq, "
                                  "autoround, hqq); on nf4 / fp4 use loftq"))

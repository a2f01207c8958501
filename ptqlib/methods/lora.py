"""LoRA, QLoRA, DoRA and QDoRA through peft: ``W x + s B A x`` with ``s = alpha / r``; only A and B train.

``qlora`` is LoRA on a frozen quantized base: bitsandbytes ``Linear4bit`` (peft's own backend) or
ptqlib's ``QuantLinear`` (the peft backend in ``ptqlib.adapters.lora_quantlinear``). With
``merge: true`` the adapter is folded into a float copy of the (de-quantized) weights, the input a
later PTQ stage needs.

``dora`` / ``qdora`` (Liu et al. 2024, DoRA) are peft's ``use_dora``: the weight is split into a
magnitude and a direction, ``W' = m (W + s B A) / ||W + s B A||_c`` (column norms), and ``m`` trains
with ``A`` and ``B``. peft computes the norm from the de-quantized base weight, which it can do for
a float model and for bitsandbytes NF4 / FP4 (QDoRA), not for ptqlib's ``QuantLinear`` (GPTQ / RTN):
there a study is refused before any stage runs.

QDoRA on a CPU with AVX512-BF16: bitsandbytes (0.50) repacks a ``Linear4bit`` weight into its CPU
kernel's layout at the first inference forward, and ``bnb.functional.dequantize_4bit`` (which peft
calls at every DoRA forward for the norm) then reads that layout as if it were the stored one:
the norms come out wrong and the model writes nothing useful (found as field F1 0.000 for every lr
in the baselines study). :func:`keep_bnb_layout` keeps the stored layout in a DoRA model.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ptqlib.methods import ArtifactType, FinetuneMethod, Options, StageSettings, register


@dataclass
class MergeOptions(Options):
    merge: bool = False  # lora/qlora/dora/qdora/loftq: merge the adapter into (de-quantized) weights -> a float model


def keep_bnb_layout(model):
    """Keep every bitsandbytes 4-bit weight of ``model`` in its stored layout (undoing a CPU repack
    already done, and none at later inference forwards), so that de-quantizing it gives the weight;
    returns ``model``. For DoRA only: bnb's own forward reads either layout."""
    for mod in model.modules():
        if not hasattr(mod, "support_avx512bf16_for_cpu"):  # not a bitsandbytes Linear4bit
            continue
        mod.support_avx512bf16_for_cpu = False
        qs = getattr(mod.weight, "quant_state", None)
        if qs is not None and getattr(qs, "packing_format_for_cpu", False):
            # bnb has no public CPU unpack (its Params4bit.cuda() / .xpu() call this one)
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            mod.weight.data, mod.weight.quant_state = _convert_weight_packed_for_cpu_inverse(mod.weight.data, qs)
    return model


def prepare(model, p: StageSettings, input_ref: str):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from ptqlib.adapters.lora_quantlinear import register as register_quantlinear

    if getattr(model, "is_loaded_in_4bit", False):
        # casts norms to fp32 and enables input grads; gradient checkpointing only costs time here
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if p.method in DORA:  # DoRA's magnitude starts as (and its forward uses) the de-quantized weight's norms
        keep_bnb_layout(model)
    cfg = LoraConfig(r=p.rank, lora_alpha=p.alpha, lora_dropout=p.dropout, use_dora=p.method in DORA,
                     target_modules=list(p.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, register_quantlinear(cfg))  # LoRA on QuantLinear too (GPTQ/RTN base)


def float_copy(input_ref: str):
    """The input model with every quantized linear replaced by its de-quantized float weight.

    What a merged adapter is folded into: peft would re-quantize a bnb layer on merge, and a
    QuantLinear cannot absorb a dense update; a float model is what a later PTQ stage needs anyway.
    """
    from ptqlib import artifacts
    from ptqlib.models import plain_copy
    from ptqlib.quant import dequantize_model

    model, tok, _ = artifacts.load(input_ref)
    if getattr(model, "is_loaded_in_4bit", False):
        model = plain_copy(model.dequantize())
    else:
        dequantize_model(model)
    return model.float(), tok


def save(model, tokenizer, p: StageSettings, output_dir, input_ref: str) -> dict:
    from ptqlib import artifacts

    out = Path(output_dir)
    model.save_pretrained(out / "adapter")
    if not p.merge:
        return {"type": "peft", "adapter": "adapter", "base": artifacts.base_ref(out, input_ref)}
    from peft import PeftModel

    base, _ = float_copy(input_ref)
    merged = PeftModel.from_pretrained(base, out / "adapter").merge_and_unload()  # base is float here
    merged.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    return {"type": "hf", "path": "model", "merged_from": "adapter"}


def load(ref, info: dict, device: str):
    from ptqlib import artifacts
    from ptqlib.adapters.lora_quantlinear import load_adapter

    base, tok, _ = artifacts.load(artifacts.base_of(ref, info), device)
    model = load_adapter(base, str(Path(ref) / info["adapter"]))  # float, bnb and QuantLinear bases
    if any(getattr(c, "use_dora", False) for c in model.peft_config.values()):
        keep_bnb_layout(model)
    return model, tok


_SETTINGS = ("lr", "steps", "rank", "alpha")
DORA = ("dora", "qdora")  # the methods that ask peft for use_dora
register(
    FinetuneMethod("lora", "LoRA on a float model (peft)", needs="float", gives="adapter", prepare=prepare,
                   save=save, settings=_SETTINGS, can_merge=True, options=MergeOptions),
    FinetuneMethod("qlora", "LoRA on a frozen quantized model (peft; bnb or QuantLinear base)", needs="quantized",
                   gives="adapter", prepare=prepare, save=save, settings=_SETTINGS, can_merge=True, options=MergeOptions),
    FinetuneMethod("dora", "DoRA on a float model (peft use_dora: a trained magnitude per column)", needs="float",
                   gives="adapter", prepare=prepare, save=save, settings=_SETTINGS, can_merge=True, options=MergeOptions),
    FinetuneMethod("qdora", "DoRA on a frozen bitsandbytes NF4 / FP4 model (peft use_dora; not on GPTQ / RTN)",
                   needs="bnb", gives="adapter", prepare=prepare, save=save, settings=_SETTINGS, can_merge=True, options=MergeOptions,
                   why_needs="; peft's DoRA de-quantizes its base to norm the columns, which it can do for "
                             "bitsandbytes, not for ptqlib's QuantLinear (gptq / rtn): use qlora on those"),
    ArtifactType("peft", load, quantized="base"),
)

"""Checks of a pipeline that need its whole chain or the model's sizes: what each method needs as its
input (``FinetuneMethod.needs``), group sizes the layers can take, ranks, positions and target layers."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ptqlib.deploy.types import refusal as gguf_refusal
from ptqlib.errors import ConfigError
from ptqlib.methods import finetune_methods, quantize_methods

if TYPE_CHECKING:
    from ptqlib.study.pipeline import Stage

def _check_against_config(path, where, stages: list[Stage], model: str, cache: dict, model_config, kinds: dict) -> None:
    """Token windows the model cannot position (GPTQ once ran 5 minutes before failing on one) and
    adapter targets that name no layer of a Llama-style model, from its config (when it is known)."""
    if ("cfg", model) not in cache:
        cache[("cfg", model)] = model_config(model)
    cfg = cache[("cfg", model)]
    if cfg is None:
        return
    cfg = cfg.get("text_config", cfg)
    limit = cfg.get("max_position_embeddings")
    llama_like = cfg.get("model_type") in ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gemma3")
    from ptqlib.models import linear_input_sizes, linear_output_sizes

    ins, outs = (linear_input_sizes(cfg), linear_output_sizes(cfg)) if llama_like else ({}, {})
    layers = tuple(ins)  # the decoder linears of a Llama-style block
    for i, st in enumerate(stages):
        swhere = f"defaults.{st.kind}" if kinds[st.kind].implicit else f"{where}[{i}].{st.kind}"
        for key in ("calib_seq_len", "ppl_seq_len", "max_length"):
            if limit and key in st.params and st.params[key] > limit:
                raise ConfigError(f"{path}: {swhere}.{key}: {st.params[key]} is more tokens than model {model!r} "
                                  f"has positions ({limit}); valid: 1 to {limit}")
        if st.params.get("ppl_samples"):  # a stage that scores held-out windows
            _check_held_out(path, swhere, st.params, model)
        if st.params.get("runtime") == "llama.cpp" and (why := gguf_refusal(cfg)):
            raise ConfigError(f"{path}: {swhere}.runtime: 'llama.cpp' runs a GGUF export, which ptqlib cannot write "
                              f"for model {model!r}: {why}; use runtime: torch")
        quantizer = quantize_methods().get(st.params.get("method")) if kinds[st.kind].makes_grid(st.params) else None
        if quantizer is not None and quantizer.grid == "gguf" and (why := gguf_refusal(cfg)):
            raise ConfigError(f"{path}: {swhere}.method: {st.params['method']!r} quantizes a GGUF export, which ptqlib "
                              f"cannot write for model {model!r}: {why}")
        unknown = [t for t in st.params.get("target_modules", []) if t not in layers]  # a stage with adapters
        if llama_like and unknown:
            raise ConfigError(f"{path}: {swhere}.target_modules: {', '.join(map(repr, unknown))} names no layer of "
                              f"model {model!r}; valid: {', '.join(layers)}")
        if llama_like and "target_modules" in st.params and "rank" in finetune_methods()[st.params["method"]].settings:
            # a rank beyond a layer's smaller side adds parameters and no expressiveness (LoftQ's SVD has
            # only that many singular values): a typo (160 for 16) more likely than a wish
            sides = {t: min(ins[t], outs[t]) for t in st.params["target_modules"]}
            most = min(sides.values())
            if st.params["rank"] > most:
                t = min(sides, key=sides.get)
                raise ConfigError(f"{path}: {swhere}.rank: {st.params['rank']} exceeds the smaller side of layer {t} "
                                  f"({ins[t]} in, {outs[t]} out) of model {model!r}; valid: 1 to {most}")


def _check_held_out(path, where: str, ev: dict, model: str) -> None:
    """More perplexity windows than the held-out text gives (it once failed only after every stage before
    the evaluate had run); checked where the model's tokenizer is on this machine (``models.held_out_capacity``)."""
    from ptqlib.models import held_out_capacity

    n, seq_len = ev["ppl_samples"], ev["ppl_seq_len"]
    for source in ev.get("ppl_sources", []):
        most = held_out_capacity(model, source, seq_len, ev.get("ppl_windows", "random"))
        if most is not None and n > most:
            raise ConfigError(f"{path}: {where}.ppl_samples: {n} windows of {seq_len} tokens is more than the held-out "
                              f"{source} text gives model {model!r} ({most}); valid: 0 to {most}, or a shorter "
                              "ppl_seq_len")


def _giving(grid: str) -> str:
    """The quantize methods whose output is a ``grid`` model, for a message: "a, b or c"."""
    names = [n for n, e in quantize_methods().items() if e.grid == grid]
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]


@dataclass
class _Input:
    """What a stage receives, as the checks track it along the chain."""

    grid: str | None = None  # the model's quantized grid: None (float), "uniform" (QuantLinear) or "bnb"
    base_group: int | None = None  # group size of the current uniform grid
    adapter: str | None = None  # an unmerged adapter on the model (the name of its method)


def check_pipeline(path, where, stages: list[Stage], model: str, sizes_cache, linear_input_sizes, model_config,
                    check_models: bool, kinds: dict) -> None:
    """Checks that need the whole chain: what each method needs as input (``FinetuneMethod.needs``,
    tracked through what the stages before it give, by each kind's ``StageKind.chain_step``; ``kinds``:
    the registry, ``study.kinds.KINDS``, passed in since it registers this module's steps) and layer sizes."""
    if check_models:
        _check_against_config(path, where, stages, model, sizes_cache, model_config, kinds)
    state = _Input()
    for i, st in enumerate(stages):
        swhere = f"{where}[{i}].{st.kind}"
        step = kinds[st.kind].chain_step  # what the kind needs of its input and gives the next stage
        groups: list[int] = step(path, swhere, st.params, state) if step else []
        if check_models and groups:
            if model not in sizes_cache:
                cfg = model_config(model)
                sizes_cache[model] = linear_input_sizes(cfg) if cfg is not None else None
            _check_groups(path, swhere, groups, model, sizes_cache[model])


def quantize_step(path, where: str, p: dict, state: _Input) -> list[int]:
    """A quantize stage needs a float input without an unmerged adapter; -> the group sizes to check."""
    if state.adapter:
        mergeable = ", ".join(n for n, e in finetune_methods().items() if e.can_merge)
        raise ConfigError(f"{path}: {where}: its input carries an unmerged {state.adapter!r} adapter; "
                          f"set merge: true on that finetune stage ({mergeable}) to quantize the merged model")
    if state.grid:
        raise ConfigError(f"{path}: {where}: the input is already quantized; add a merge (finetune with "
                          "merge: true) first")
    entry = quantize_methods()[p["method"]]
    why = entry.check(p) if entry.check else None
    if why:
        raise ConfigError(f"{path}: {where}: {why}")
    state.grid = entry.grid
    state.base_group = p["group_size"] if state.grid == "uniform" else None
    return [p["group_size"]] if state.grid == "uniform" else []


def finetune_step(path, where: str, p: dict, state: _Input) -> list[int]:
    """A finetune stage's method gets the input it needs (``FinetuneMethod.needs``); its ``group_size`` is
    resolved where it pools over the base's groups; -> the group sizes to check."""
    ft = finetune_methods()
    name, m = p["method"], ft[p["method"]]
    grid = state.grid
    if m.needs != "float" and not grid:
        raise ConfigError(f"{path}: {where}.method: {name!r} trains adapters on a quantized model; put a "
                          "quantize stage before it")
    if m.needs == "float" and grid:
        raise ConfigError(f"{path}: {where}.method: {name!r} needs a float model but its input is quantized; "
                          f"valid on a quantized input: {', '.join(n for n, e in ft.items() if e.needs != 'float')}")
    if m.needs == "uniform" and grid != "uniform":
        raise ConfigError(f"{path}: {where}.method: {name!r} needs a uniform grid (integer codes, scale and zero per "
                          f"group); its input is not one (quantize with method {_giving('uniform')} first){m.why_needs}")
    if m.needs == "bnb" and grid != "bnb":
        raise ConfigError(f"{path}: {where}.method: {name!r} needs a bitsandbytes 4-bit input; "
                          f"its input is not one (quantize with method {_giving('bnb')} first){m.why_needs}")
    groups: list[int] = []
    if m.group == "base":
        # pooling over the base's quantization groups is what makes the merge exact
        if p["group_size"] not in (0, state.base_group):
            raise ConfigError(f"{path}: {where}.group_size: {p['group_size']} differs from the quantized "
                              f"base's group_size {state.base_group}; {name} pools over the base's groups, so leave "
                              f"group_size out or set it to {state.base_group}")
        p["group_size"] = state.base_group  # resolved: the stage id and label carry the real value
    if m.group == "own":
        groups = [p["group_size"]]
    if m.gives == "float" or (m.gives == "adapter" and p["merge"]):
        state.grid, state.base_group = None, None
    elif m.gives == "quantized":
        state.grid, state.base_group = m.grid, p["group_size"] if m.grid == "uniform" else None
        state.adapter = name if m.keeps_adapter else None
    elif m.gives == "adapter":
        state.adapter = name
    return groups


def _check_groups(path, where: str, groups: list[int], model: str, sizes: dict[str, int] | None) -> None:
    """Each group size (-1: the whole row) divides every linear layer's input size (``sizes``; None: unknown)."""
    for g in groups if sizes is not None else []:
        if g == -1:
            continue
        bad = {k: n for k, n in sizes.items() if n % g}
        if bad:
            raise ConfigError(f"{path}: {where}.group_size: {g} does not divide the input size of "
                              + ", ".join(f"{k} ({n})" for k, n in bad.items())
                              + f" in model {model!r}; valid: -1 or a divisor of "
                              + ", ".join(sorted({str(n) for n in sizes.values()})))

"""Evaluation: held-out perplexity, greedy batched generation and its task metrics, size, speed.

Every score is kept per unit (per task example, per perplexity window) as well as aggregated,
so the analysis can pair two pipelines example by example (``ptqlib.report.claims.check_claims``).
The aggregate of each metric is computed from its units by ``ptqlib.metrics.statistic``.
"""
from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from ptqlib.data import Example, format_prompt
from ptqlib.metrics import example_scores, next_token_closeness, ppl_statistic, statistic, task_scores
from ptqlib.precision import attention_kernels
from ptqlib.stages.generation import model_device
from ptqlib.stages.hf_generation import decode_speed, hf_generate
from ptqlib.text import held_out_windows

if TYPE_CHECKING:
    from ptqlib.study.params import EvaluateParams


LOGIT_ROWS = 16
"""Positions per chunk of the logits scored at a time: their float32 copy (3 MiB at SmolLM2's
49152-token vocabulary) stays in cache, where the whole (b, L, vocab) tensor did not (NLL, KL and
top-1 of 4 windows of 256 bf16 logits and their reference's, 2 threads on an Intel Xeon: 16 rows
0.15 s, 64 rows 0.21 s, 128 rows 0.31 s)."""


def _row_chunks(n_windows: int, n_positions: int):
    """``(window, positions)`` pairs covering ``(n_windows, n_positions)`` in chunks of :data:`LOGIT_ROWS`."""
    for i in range(n_windows):
        for r in range(0, n_positions, LOGIT_ROWS):
            yield i, slice(r, min(r + LOGIT_ROWS, n_positions))


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def next_token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per position ``-log softmax(logits)[target]``: ``logits (b, T, vocab)``, ``targets (b, T)`` -> ``(b, T)``
    in float32 (float64 logits: float64).

    The log-softmax runs over the last, contiguous dimension, :data:`LOGIT_ROWS` positions at a time,
    each chunk cast to float32 on its own (bf16 logits are never copied whole). ``cross_entropy``
    given the classes in the middle (``logits.transpose(1, 2)``, as ptqlib did before) copies the
    logits transposed and runs the strided kernel on CPU: 5x slower at SmolLM2's 49152-token
    vocabulary and ~20x further from the float64 value (7e-5 vs 4e-6 nats per token). The kernel
    works row by row, so the chunks give every position the bits the whole tensor gives (a test
    says so); at SmolLM2's shapes the whole tensor's float32 copy and log-softmax output (800 MB per
    batch of 8 windows, fresh pages every batch) took over half of a bf16 perplexity pass.
    """
    out = torch.empty(targets.shape, dtype=torch.promote_types(logits.dtype, torch.float32), device=logits.device)
    for i, s in _row_chunks(*targets.shape):
        out[i, s] = torch.nn.functional.cross_entropy(_at_least_fp32(logits[i, s]), targets[i, s], reduction="none")
    return out


@torch.no_grad()
def window_nll(model, windows: torch.Tensor, batch_size: int = 8, progress: bool = False,
               reference=None) -> dict[str, list[float]]:
    """Per window of ``windows`` (n, L): summed next-token NLL and the number of predicted tokens;
    with a ``reference`` model also the summed ``KL(P_ref || P_model)`` of the next-token
    distributions (``kl``) and the number of positions whose most likely token agrees (``top1``),
    as llama.cpp's ``perplexity --kl-divergence`` reports them (far more sensitive than perplexity
    to what quantization changes). Both models run on the same batch, so no reference logits are
    stored: the KL is exact over the whole vocabulary, not a top-k approximation. ``reference`` may be a
    :class:`~ptqlib.stages.reference.CachedReference` (its hidden states from an earlier stage: the same logits).

    At most 8 windows per forward (4 with a reference): the full-vocabulary logits are
    (b, L, vocab) in the model's dtype, and a larger batch only costs memory (a forward is
    compute-bound on CPU). They are scored :data:`LOGIT_ROWS` positions at a time in float32.
    """
    with attention_kernels(model_device(model).type):
        return _window_nll(model, windows, batch_size, progress, reference)


def _window_nll(model, windows: torch.Tensor, batch_size: int, progress: bool, reference) -> dict[str, list[float]]:
    dev = model_device(model)
    out: dict[str, list[float]] = {"nll": [], "tokens": [float(windows.shape[1] - 1)] * len(windows)}
    if reference is not None:
        out.update(kl=[], top1=[], dp=[], kl_tokens=[])  # kl_tokens: every position's KL (its quantiles)
    batch_size = min(batch_size, 8 if reference is None else 4)
    for i in tqdm(range(0, len(windows), batch_size), desc="perplexity", disable=not progress):
        x = windows[i : i + batch_size].to(dev)
        logits = model(input_ids=x).logits[:, :-1]  # (b, L-1, vocab), the model's dtype
        y = x[:, 1:]
        if reference is None:
            out["nll"] += next_token_nll(logits, y).sum(1).tolist()
            continue
        ref_logits = _reference_logits(reference, x)[:, :-1].to(dev)
        nll, kl, top1, dp = (torch.empty(y.shape, device=dev) for _ in range(4))  # (b, L-1) per position
        for j, s in _row_chunks(*y.shape):  # log_softmax in float32, the kernel of next_token_nll: its bits
            nll[j, s], kl[j, s], top1[j, s], dp[j, s] = next_token_closeness(
                _at_least_fp32(logits[j, s]), _at_least_fp32(ref_logits[j, s]), y[j, s])
        out["nll"] += nll.sum(1).tolist()
        out["kl"] += kl.sum(1).tolist()  # sum over tokens of KL per token
        out["top1"] += top1.sum(1).tolist()
        out["dp"] += dp.sum(1).tolist()
        out["kl_tokens"] += kl.flatten().tolist()
    return out


def _reference_logits(reference, x: torch.Tensor) -> torch.Tensor:
    """The reference's logits (b, L, vocab) on ``x``: a model's forward, or a ``CachedReference``'s."""
    from ptqlib.stages.reference import CachedReference

    if isinstance(reference, CachedReference):
        return reference.logits(x)
    return reference(input_ids=x.to(model_device(reference))).logits


def _closeness_metrics(unit: dict[str, list[float]], kl_tokens: list[float], suffix: str) -> dict[str, float]:
    """``kl``, ``top1_agree``, ``delta_p`` and the KL's quantiles of one perplexity source (``suffix``: "" or
    ``_<source>``) from its per-window units and every position's KL."""
    out = {}
    for metric in ("kl" + suffix, "top1_agree" + suffix, "delta_p" + suffix):
        st = statistic(metric)
        out[metric] = st(unit[st.num], unit[st.den])
    return {**out, **kl_quantiles(kl_tokens, suffix)}


def kl_quantiles(kl_tokens: list[float], suffix: str = "") -> dict[str, float]:
    """The per-token KL's median, 90th and 99th percentiles and maximum (``kl_p50``, ``kl_p90``, ``kl_p99``,
    ``kl_max``, each with the source's ``suffix``), as llama.cpp's ``perplexity --kl-divergence`` reports them:
    the mean KL hides the few positions where a quantized model goes wrong."""
    t = torch.tensor(kl_tokens, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64)).tolist()
    return {f"kl_p50{suffix}": q[0], f"kl_p90{suffix}": q[1], f"kl_p99{suffix}": q[2], f"kl_max{suffix}": float(t.max())}


def perplexity(model, windows: torch.Tensor, batch_size: int = 8, progress: bool = False) -> float:
    """exp(mean next-token NLL) over all predicted tokens of ``windows`` (n, L)."""
    w = window_nll(model, windows, batch_size, progress)
    return math.exp(sum(w["nll"]) / sum(w["tokens"]))


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 64, batch_size: int = 8,
             progress: bool = False, generation: str = "prefix") -> tuple[list[str], int, float]:
    """Greedy, batched -> (texts, new tokens (EOS included), seconds of the timed batches).

    ``generation``: ``prefix`` runs :func:`ptqlib.stages.generation.greedy` (the prompts' shared prefix
    computed once, finished rows dropped); ``generate`` runs transformers' ``generate`` on left-padded
    batches (the path of every evaluate stage before; the same tokens in fp32). Prompts are sorted by
    length before batching (and the outputs put back in order), so a batch pads little. A short
    untimed warm-up comes first, so the tokens/s of the first model of a process is not a cold start.
    """
    from ptqlib.study.params import GENERATIONS

    if generation not in GENERATIONS:
        raise ValueError(f"generation: {generation!r} is not valid; valid: {', '.join(GENERATIONS)}")
    with attention_kernels(model_device(model).type):
        if generation == "generate":
            return hf_generate(model, tokenizer, prompts, max_new_tokens, batch_size, progress)
        return _greedy(model, tokenizer, prompts, max_new_tokens, batch_size, progress)


def _greedy(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int,
            progress: bool) -> tuple[list[str], int, float]:
    from ptqlib.stages.generation import greedy

    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    ids = [tokenizer(format_prompt(tokenizer, p), add_special_tokens=False)["input_ids"] for p in prompts]
    if ids:  # warm-up, untimed: the first call pays for allocator growth and kernel selection
        greedy(model, ids[:1], 2, eos, pad)
    outs, seconds = greedy(model, ids, max_new_tokens, eos, pad, batch_size, progress)
    texts = [tokenizer.decode(o, skip_special_tokens=True).strip() for o in outs]
    return texts, sum(len(o) for o in outs), seconds


def _score_task(texts: list[str], examples: list[Example], n_tokens: int, seconds: float, metrics: dict,
                units: dict) -> list[dict]:
    """Task units and metrics of generated ``texts`` (into ``units`` / ``metrics``) -> the generated rows.

    One scoring path for every runtime, so torch and llama.cpp results pair unit by unit.
    """
    refs, sources = [e.completion for e in examples], [e.source for e in examples]
    units["task"] = example_scores(texts, refs, sources)
    if any(e.doc >= 0 for e in examples):  # examples of one source document: a cluster in the claims' interval
        units["task"]["doc"] = [float(e.doc) for e in examples]
    metrics.update(task_scores(texts, refs, sources))
    metrics["gen_tokens_per_s"] = n_tokens / seconds if seconds else math.nan
    metrics["gen_tokens"] = n_tokens
    metrics["task_examples"] = len(examples)
    return [{"prompt": e.prompt, "reference": e.completion, "output": t} for e, t in zip(examples, texts)]


def evaluate_model(model, tokenizer, examples: list[Example], ppl_samples: int = 16, ppl_seq_len: int = 256,
                   max_new_tokens: int = 64, batch_size: int = 8, progress: bool = False,
                   ppl_sources: tuple[str, ...] = ("pydoc",), ppl_windows: str = "random", reference=None,
                   generation: str = "prefix") -> tuple[dict, list[dict], dict]:
    """All quality and speed metrics of one model -> (metrics, generated examples, units).

    ``units`` holds the per-unit columns by group: ``task`` (one entry per example, see
    ``metrics.example_scores``) and one group per perplexity source (``ppl`` for pydoc,
    ``ppl_<source>`` for the others: ``nll``, ``tokens`` and ``doc`` per window; ``ppl_windows``:
    the windows' layout, ``text.held_out_windows``; with a ``reference`` model also ``kl`` and
    ``top1`` per window, giving the metrics ``kl`` / ``kl_<source>`` and ``top1_agree`` /
    ``top1_agree_<source>``, see :func:`window_nll`). ``generation``: see :func:`generate`.
    """
    metrics: dict = {}
    units: dict[str, dict[str, list[float]]] = {}
    t0 = time.perf_counter()
    for source in ppl_sources:
        name = "ppl" if source == "pydoc" else f"ppl_{source}"
        windows, docs = held_out_windows(tokenizer, source, ppl_seq_len, ppl_samples, ppl_windows)
        w = window_nll(model, windows, batch_size, progress, reference)
        kl_tokens = w.pop("kl_tokens", None)  # per position, not per window: its quantiles only
        units[name] = {**w, "doc": [float(d) for d in docs]}
        metrics[name] = ppl_statistic(name)(units[name]["nll"], units[name]["tokens"])
        if reference is not None:
            metrics.update(_closeness_metrics(units[name], kl_tokens, name[len("ppl"):]))
    metrics["ppl_seconds"] = time.perf_counter() - t0
    rows: list[dict] = []
    if examples:
        prompts = [e.prompt for e in examples]
        t0 = time.perf_counter()
        texts, n_tok, secs = generate(model, tokenizer, prompts, max_new_tokens, batch_size, progress, generation)
        metrics["gen_seconds"] = time.perf_counter() - t0
        rows = _score_task(texts, examples, n_tok, secs, metrics, units)
    return metrics, rows, units


def evaluate_gguf(path, tokenizer, examples: list[Example], ppl_samples: int = 16, ppl_seq_len: int = 256,
                  max_new_tokens: int = 64, ppl_sources: tuple[str, ...] = ("pydoc",),
                  speed_prompts: int = 4, speed_tokens: int = 64, n_threads: int | None = None,
                  ppl_windows: str = "random", reference: str | None = None) -> tuple[dict, list[dict], dict]:
    """:func:`evaluate_model` for a GGUF file run by llama.cpp: the same windows, prompts and scores; with a
    ``reference`` (a model name or a stage's run directory) the same KL, top-1 and Delta-p metrics against its
    float32 torch forward, beside llama.cpp's logits.

    Adds ``ttft_s`` and ``decode_tokens_per_s`` (batch 1, see :func:`decode_speed`) and
    ``peak_rss_mb`` of the llama.cpp process, and ``llamacpp_extra_buffers`` (1.0 when llama.cpp
    repacked the weights at load, see ``deploy.llamacpp``). Generation is one prompt at a time (llama.cpp's
    single-sequence API), so ``gen_tokens_per_s`` is not comparable with batched torch generation.
    """
    from ptqlib.deploy import llamacpp

    held = {("ppl" if s == "pydoc" else f"ppl_{s}"): held_out_windows(tokenizer, s, ppl_seq_len, ppl_samples, ppl_windows)
            for s in ppl_sources}
    windows = {name: w.tolist() for name, (w, _) in held.items()}
    prompt_ids = [tokenizer(format_prompt(tokenizer, e.prompt), add_special_tokens=False)["input_ids"] for e in examples]
    n_ctx = max([ppl_seq_len] + [len(p) + max(max_new_tokens, speed_tokens) for p in prompt_ids]) + 8
    res = llamacpp.run(path, windows, prompt_ids, max_new_tokens, tokenizer.eos_token_id,
                       speed_prompts=prompt_ids[:speed_prompts], speed_tokens=speed_tokens,
                       n_threads=n_threads, n_ctx=n_ctx, reference=reference)
    metrics: dict = {}
    units: dict[str, dict[str, list[float]]] = {}
    for name, w in res.get("windows", {}).items():
        kl_tokens = w.pop("kl_tokens", None)
        units[name] = {**w, "doc": [float(d) for d in held[name][1]]}
        metrics[name] = ppl_statistic(name)(w["nll"], w["tokens"])
        if kl_tokens is not None:
            metrics.update(_closeness_metrics(units[name], kl_tokens, name[len("ppl"):]))
    metrics["ppl_seconds"] = res.get("ppl_seconds", 0.0)
    rows: list[dict] = []
    if examples:
        eos = tokenizer.eos_token_id
        texts = [tokenizer.decode([t for t in ids if t != eos], skip_special_tokens=True).strip() for ids in res["outputs"]]
        metrics["gen_seconds"] = res["gen_seconds"]
        rows = _score_task(texts, examples, res["gen_tokens"], res["gen_seconds"], metrics, units)
    for k in ("ttft_s", "decode_tokens_per_s", "peak_rss_mb", "load_seconds"):
        if k in res:
            metrics[k] = res[k]
    metrics["llamacpp_extra_buffers"] = float(res["extra_buffers"])  # 1: weights repacked at load
    return metrics, rows, units


def model_metrics(model, input_ref) -> dict[str, float]:
    """Size of the evaluated model: ``artifacts.size_metrics`` (deployed and stored MB) and ``model_params``."""
    from ptqlib import artifacts

    return {**artifacts.size_metrics(model, input_ref), "model_params": sum(p.numel() for p in model.parameters())}


def _run_llamacpp(model, tokenizer, input_ref, examples: list[Example], p: EvaluateParams, output_dir,
                  reference: str | None = None):
    """Runtime llama.cpp: the model exported to ``output_dir/model.gguf`` (or, at ``gguf_type: auto``, the
    GGUF file the input stage is: a K-quant) and scored in a llama.cpp process, with the file's metrics (and,
    with ``p.kl_reference``, the KL against the pipeline's ``reference``)."""
    from pathlib import Path

    from ptqlib import artifacts
    from ptqlib.deploy import deployed_metrics, export_gguf
    from ptqlib.deploy.kquants import file_report

    own = artifacts.own_gguf(input_ref) if p.gguf_type == "auto" else None
    gguf = own or Path(output_dir) / "model.gguf"
    export = file_report(own) if own else export_gguf(model, tokenizer, gguf, type=p.gguf_type, lossy=p.gguf_lossy)
    metrics, generations, units = evaluate_gguf(gguf, tokenizer, examples, p.ppl_samples, p.ppl_seq_len,
                                                p.max_new_tokens, tuple(p.ppl_sources), p.speed_prompts,
                                                p.speed_tokens, ppl_windows=p.ppl_windows,
                                                reference=reference if p.kl_reference else None)
    metrics.update(deployed_metrics(export, model.config, metrics.get("decode_tokens_per_s")))
    return metrics, generations, units


def run_stage(model, tokenizer, input_ref, examples: list[Example], p: EvaluateParams, output_dir, progress: bool = False,
              reference: str | None = None):
    """The evaluate stage for ``p`` (EvaluateParams, or a dict of them) -> ``(metrics, generations, units)``.

    Runtime ``torch``: the model as loaded (:func:`evaluate_model`, then batch-1 speed if asked);
    ``llama.cpp``: exported to ``output_dir/model.gguf`` (a K-quant stage's own file as it is) and scored in a
    llama.cpp process (:func:`_run_llamacpp`). Then the model's size (:func:`model_metrics`) and the lm-eval
    tasks, if any (torch only).
    ``reference``: the pipeline's 16-bit reference (a model name or a stage's run directory; the
    runner passes the input of the pipeline's first quantizing stage): with ``p.kl_reference`` the
    KL divergence and top-1 agreement against it on the perplexity windows (in llama.cpp too, against
    the reference's float32 forward).
    """

    from ptqlib.study.kinds import as_params

    p = as_params("evaluate", p)
    sources = tuple(p.ppl_sources)
    if p.runtime == "llama.cpp":  # the deployed file: exported here (or the stage's own), scored in llama.cpp
        metrics, generations, units = _run_llamacpp(model, tokenizer, input_ref, examples, p, output_dir, reference)
    else:
        from ptqlib.methods import prepare_inference
        from ptqlib.precision import cast_for_inference, dtype, resolve

        cast_for_inference(model, p.precision)  # bf16: the float weights in bf16, QuantLinear codes as they are
        prepare_inference(model, dtype(resolve(p.precision)))  # each method's layers (NF4 / FP4: de-quantized once)
        ref = None
        if p.kl_reference and reference:
            from ptqlib import artifacts
            from ptqlib.stages.reference import CachedReference, cache_dir

            ref = CachedReference(cast_for_inference(artifacts.load(reference)[0], p.precision).eval(),
                                  cache_dir(reference))
        metrics, generations, units = evaluate_model(model, tokenizer, examples, p.ppl_samples, p.ppl_seq_len,
                                                     p.max_new_tokens, p.batch_size, progress=progress,
                                                     ppl_sources=sources, ppl_windows=p.ppl_windows, reference=ref,
                                                     generation=p.generation)
        del ref
        if p.speed_prompts:
            metrics.update(decode_speed(model, tokenizer, [e.prompt for e in examples[:p.speed_prompts]],
                                        p.speed_tokens))
        metrics["precision"] = resolve(p.precision)
    metrics.update(model_metrics(model, input_ref))
    if p.lm_eval_tasks:  # MMLU / commonsense through lm-evaluation-harness
        from ptqlib.stages.lmeval import run_lm_eval

        metrics.update(run_lm_eval(model, tokenizer, list(p.lm_eval_tasks),
                                   num_fewshot=None if p.lm_eval_fewshot < 0 else p.lm_eval_fewshot,
                                   limit=p.lm_eval_limit or None, batch_size=p.batch_size,
                                   include_path=p.lm_eval_include or None, units=units))  # per-item units
    return metrics, generations, units

"""Run an exported GGUF file in llama.cpp (through ``llama-cpp-python``): scores and speed.

The study scores a deployed file on the same units as the torch evaluation (perplexity windows,
task examples), so ``runtime: llama.cpp`` results pair with torch ones in the analysis. Text is
tokenized by the model's own transformers tokenizer and token ids are given to llama.cpp, so a
difference between runtimes is a difference of weights and kernels, never of tokenization.

llama.cpp runs in a child process (``spawn``): its peak resident memory is then the memory of
the deployed model (weights mapped from the file, KV cache, compute buffers) plus a bare Python,
not of the torch model the stage loaded to export it.

llama.cpp may repack weights at load into "extra" buffer types (AMX tiles, wider SIMD blocks).
On a CPU with AMX, llama-cpp-python 0.3.36's AMX path crashes the process (segfault) on Q4_1
tensors (the test suite's tiny model and SmolLM2-135M alike), so there the extra buffers are off
by default (``default_extra_buffers``); ``run`` reports which setting a measurement used.
"""
from __future__ import annotations

import math
import os
import resource
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from functools import cache
from multiprocessing import get_context
from pathlib import Path

import numpy as np


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def require() -> None:
    if not available():
        raise ImportError("runtime 'llama.cpp' needs llama-cpp-python: pip install -e '.[llamacpp]' "
                          "(builds llama.cpp from source once, then pip caches the wheel)")


@cache
def cpu_has_amx() -> bool:
    """Whether this CPU has Intel AMX (Linux: the ``amx_int8`` flag in /proc/cpuinfo)."""
    try:
        return "amx_int8" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def default_extra_buffers() -> bool:
    """llama.cpp's extra (repacked) weight buffers: on, except on an AMX CPU (module docstring)."""
    return not cpu_has_amx()


@contextmanager
def _model_params(use_extra_bufts: bool):
    """``Llama()`` has no argument for ``llama_model_params.use_extra_bufts``; it reads the
    defaults from ``llama_model_default_params``, so that function is wrapped while one loads."""
    import llama_cpp.llama_cpp as C

    default = C.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = use_extra_bufts
        return p

    C.llama_model_default_params = params
    try:
        yield
    finally:
        C.llama_model_default_params = default


class LlamaCppModel:
    """One GGUF file loaded in llama.cpp; every call starts from an empty KV cache.

    ``extra_buffers``: let llama.cpp repack weights into its extra buffer types (None:
    ``default_extra_buffers()``).
    """

    def __init__(self, path: str | Path, n_ctx: int = 2048, n_threads: int | None = None, logits_all: bool = False,
                 extra_buffers: bool | None = None):
        require()
        from llama_cpp import Llama

        threads = n_threads or max(1, len(os.sched_getaffinity(0)))
        self.extra_buffers = default_extra_buffers() if extra_buffers is None else extra_buffers
        with _model_params(self.extra_buffers):
            self.llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=min(512, n_ctx), n_threads=threads,
                             n_threads_batch=threads, logits_all=logits_all, verbose=False)
        self.logits_all = logits_all

    def close(self) -> None:
        """Free the model and context now (not at interpreter exit, where llama-cpp-python's
        destructor can run after its library is unloaded)."""
        self.llm.close()

    def __enter__(self) -> "LlamaCppModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def logits(self, ids: list[int]) -> np.ndarray:
        """Next-token logits ``(len(ids), vocab)`` for every position (needs ``logits_all``)."""
        if not self.logits_all:
            raise ValueError("logits() needs LlamaCppModel(..., logits_all=True)")
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def window_nll(self, windows: list[list[int]]) -> dict[str, list[float]]:
        """Summed next-token NLL and predicted-token count per window (as ``evaluate.window_nll``)."""
        nll = []
        for w in windows:
            lg = self.logits(w)[:-1].astype(np.float64)  # (L-1, vocab)
            m = lg.max(1, keepdims=True)
            logz = (m[:, 0] + np.log(np.exp(lg - m).sum(1)))
            nll.append(float((logz - lg[np.arange(len(w) - 1), w[1:]]).sum()))
        return {"nll": nll, "tokens": [float(len(w) - 1) for w in windows]}

    def generate(self, prompt: list[int], max_new_tokens: int, eos_id: int | None,
                 stop_at_eos: bool = True) -> tuple[list[int], float, float]:
        """Greedy continuation -> (new ids, seconds to the first token, seconds of the remaining decode)."""
        self.llm.reset()
        out: list[int] = []
        t0 = time.perf_counter()
        t_first = None
        for tok in self.llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
            if t_first is None:
                t_first = time.perf_counter()
            out.append(int(tok))
            if (stop_at_eos and tok == eos_id) or len(out) >= max_new_tokens:
                break
        t_end = time.perf_counter()
        return out, (t_first or t_end) - t0, t_end - (t_first or t_end)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _worker(path: str, windows: dict[str, list[list[int]]], prompts: list[list[int]], max_new_tokens: int,
            eos_id: int | None, speed_prompts: list[list[int]], speed_tokens: int, n_threads: int | None,
            n_ctx: int) -> dict:
    """Everything llama.cpp computes for one evaluation, in one child process."""
    res: dict = {"rss_start_mb": _peak_rss_mb()}
    t0 = time.perf_counter()
    if windows:
        scorer = LlamaCppModel(path, n_ctx=n_ctx, n_threads=n_threads, logits_all=True)
        res["load_seconds"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        res["windows"] = {k: scorer.window_nll(v) for k, v in windows.items()}
        res["ppl_seconds"] = time.perf_counter() - t0
        scorer.close()
    gen = LlamaCppModel(path, n_ctx=n_ctx, n_threads=n_threads, logits_all=False)
    res.setdefault("load_seconds", time.perf_counter() - t0)
    res["extra_buffers"] = gen.extra_buffers
    if speed_prompts:
        gen.generate(speed_prompts[0], 4, eos_id)  # warm-up, untimed
    t0 = time.perf_counter()
    outs, n_new = [], 0
    for p in prompts:
        ids, _, _ = gen.generate(p, max_new_tokens, eos_id)
        outs.append(ids)
        n_new += len(ids)
    res["gen_seconds"] = time.perf_counter() - t0
    res["outputs"], res["gen_tokens"] = outs, n_new
    # speed: batch-1 decode of a fixed number of tokens (EOS ignored) after each prompt
    ttft, dec_s, dec_n = [], 0.0, 0
    for p in speed_prompts:
        ids, t_first, t_rest = gen.generate(p, speed_tokens, eos_id, stop_at_eos=False)
        ttft.append(t_first)
        dec_s += t_rest
        dec_n += len(ids) - 1
    if speed_prompts:
        res["ttft_s"] = float(np.median(ttft))
        res["decode_tokens_per_s"] = dec_n / dec_s if dec_s else math.nan
    res["peak_rss_mb"] = _peak_rss_mb()
    gen.close()
    return res


def run(path: str | Path, windows: dict[str, list[list[int]]], prompts: list[list[int]], max_new_tokens: int,
        eos_id: int | None, speed_prompts: list[list[int]] = (), speed_tokens: int = 64,
        n_threads: int | None = None, n_ctx: int = 2048) -> dict:
    """Score ``windows`` (per source) and generate from ``prompts`` in a fresh llama.cpp process.

    Returns ``windows`` (per source: ``nll``, ``tokens``), ``outputs`` (new ids per prompt, EOS
    included when produced), ``gen_tokens``, ``gen_seconds``, ``ppl_seconds``, ``load_seconds``,
    ``ttft_s`` (median prefill + first token), ``decode_tokens_per_s`` (batch 1, after the first
    token), ``peak_rss_mb`` of that process and ``extra_buffers`` (repacked weights or not).
    """
    require()
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as ex:
        return ex.submit(_worker, str(path), windows, [list(p) for p in prompts], max_new_tokens, eos_id,
                         [list(p) for p in speed_prompts], speed_tokens, n_threads, n_ctx).result()

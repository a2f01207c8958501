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

    def window_nll(self, windows: list[list[int]], reference=None) -> dict[str, list[float]]:
        """Summed next-token NLL and predicted-token count per window (as ``evaluate.window_nll``); with a
        ``reference`` (a torch model) also the summed KL, top-1 agreement and Delta-p against its next-token
        distributions (``metrics.next_token_closeness``) and every position's KL (``kl_tokens``)."""
        out: dict[str, list[float]] = {"nll": [], "tokens": [float(len(w) - 1) for w in windows]}
        if reference is not None:
            out.update(kl=[], top1=[], dp=[], kl_tokens=[])
        for w in windows:
            lg = self.logits(w)[:-1]  # (L-1, vocab) float32
            lg64 = lg.astype(np.float64)
            m = lg64.max(1, keepdims=True)
            logz = (m[:, 0] + np.log(np.exp(lg64 - m).sum(1)))
            out["nll"].append(float((logz - lg64[np.arange(len(w) - 1), w[1:]]).sum()))
            if reference is not None:
                _, kl, top1, dp = _closeness(lg, w, reference)
                out["kl"].append(float(kl.sum()))
                out["top1"].append(float(top1.sum()))
                out["dp"].append(float(dp.sum()))
                out["kl_tokens"] += kl.tolist()
        return out

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


def _closeness(logits: np.ndarray, ids: list[int], reference):
    """``metrics.next_token_closeness`` of llama.cpp's ``logits`` (L-1, vocab) against ``reference``'s forward
    (a torch model, float32) on the same window ``ids`` (L)."""
    import torch

    from ptqlib.metrics import next_token_closeness

    x = torch.tensor([ids])
    with torch.no_grad():
        ref = reference(input_ids=x).logits[0, :-1].float()  # (L-1, vocab)
    return next_token_closeness(torch.from_numpy(logits), ref, x[0, 1:])


def _load_reference(reference: str | None, n_threads: int | None):
    """The pipeline's 16-bit reference in float32 (a model name or a stage's run directory), or None."""
    if not reference:
        return None
    import torch

    from ptqlib import artifacts

    if n_threads:
        torch.set_num_threads(n_threads)
    return artifacts.load(reference, "cpu")[0].float().eval()


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _score_worker(path: str, windows: dict[str, list[list[int]]], n_threads: int | None, n_ctx: int,
                  reference: str | None) -> dict:
    """The perplexity windows scored by llama.cpp (every position's logits), and with a ``reference`` compared
    with its torch forward, in a child process of its own: the generation process's peak memory is then what
    deploying the file costs, not the scorer's all-positions logits or a torch model."""
    ref = _load_reference(reference, n_threads)
    scorer = LlamaCppModel(path, n_ctx=n_ctx, n_threads=n_threads, logits_all=True)
    t0 = time.perf_counter()
    res = {"windows": {k: scorer.window_nll(v, ref) for k, v in windows.items()}}
    res["ppl_seconds"] = time.perf_counter() - t0
    scorer.close()
    return res


def _worker(path: str, prompts: list[list[int]], max_new_tokens: int, eos_id: int | None,
            speed_prompts: list[list[int]], speed_tokens: int, n_threads: int | None, n_ctx: int) -> dict:
    """Generation and batch-1 speed by llama.cpp for one evaluation, in one child process."""
    res: dict = {"rss_start_mb": _peak_rss_mb()}
    t0 = time.perf_counter()
    gen = LlamaCppModel(path, n_ctx=n_ctx, n_threads=n_threads, logits_all=False)
    res["load_seconds"] = time.perf_counter() - t0
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
        n_threads: int | None = None, n_ctx: int = 2048, reference: str | None = None) -> dict:
    """Score ``windows`` (per source) in one fresh llama.cpp process, then generate from ``prompts`` in another.

    Returns ``windows`` (per source: ``nll``, ``tokens``; with a ``reference``, a model name or a stage's run
    directory: also ``kl``, ``top1``, ``dp`` per window and ``kl_tokens`` per position, against its float32
    torch forward), ``outputs`` (new ids per prompt, EOS included when produced), ``gen_tokens``,
    ``gen_seconds``, ``ppl_seconds``, ``load_seconds``, ``ttft_s`` (median prefill + first token),
    ``decode_tokens_per_s`` (batch 1, after the first token), ``peak_rss_mb`` of the generating process and
    ``extra_buffers`` (repacked weights or not).
    """
    require()
    res: dict = {}
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as ex:
        if windows:
            res.update(ex.submit(_score_worker, str(path), windows, n_threads, n_ctx, reference).result())
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as ex:  # a fresh process: its RSS
        res.update(ex.submit(_worker, str(path), [list(p) for p in prompts], max_new_tokens, eos_id,
                             [list(p) for p in speed_prompts], speed_tokens, n_threads, n_ctx).result())
    return res

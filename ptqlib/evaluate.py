"""Evaluation: held-out perplexity, greedy batched generation and its task metrics, size, speed."""
from __future__ import annotations

import math
import time

import torch
from tqdm.auto import tqdm

from ptqlib.data import Example, format_prompt, text_windows
from ptqlib.metrics import task_scores


def _device(model) -> torch.device:
    return next(p for p in model.parameters()).device


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 8, progress: bool = False) -> float:
    """exp(mean next-token NLL) over all predicted tokens of ``windows`` (n, L)."""
    dev = _device(model)
    nll, count = 0.0, 0
    for i in tqdm(range(0, len(windows), batch_size), desc="perplexity", disable=not progress):
        x = windows[i : i + batch_size].to(dev)
        logits = model(input_ids=x).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1),
                                                 reduction="sum")
        nll += loss.item()
        count += x[:, 1:].numel()
    return math.exp(nll / count)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 64, batch_size: int = 8,
             progress: bool = False) -> tuple[list[str], int, float]:
    """Greedy, batched (left padding), fixed max length -> (texts, new tokens, seconds)."""
    dev = _device(model)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    texts, n_tokens, seconds = [], 0, 0.0
    eos = tokenizer.eos_token_id
    try:
        for i in tqdm(range(0, len(prompts), batch_size), desc="generate", disable=not progress):
            chunk = [format_prompt(tokenizer, p) for p in prompts[i : i + batch_size]]
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(dev)
            t0 = time.perf_counter()
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=eos)
            seconds += time.perf_counter() - t0
            new = out[:, enc["input_ids"].shape[1]:]
            for row in new:
                row = row.tolist()
                k = row.index(eos) + 1 if eos in row else len(row)  # tokens actually generated
                n_tokens += k
                texts.append(tokenizer.decode(row[:k], skip_special_tokens=True).strip())
    finally:
        tokenizer.padding_side = side
    return texts, n_tokens, seconds


def evaluate_model(model, tokenizer, examples: list[Example], ppl_samples: int = 16, ppl_seq_len: int = 256,
                   max_new_tokens: int = 64, batch_size: int = 8, progress: bool = False) -> tuple[dict, list[dict]]:
    """All quality and speed metrics of one model -> (metrics, generated examples)."""
    metrics: dict = {}
    t0 = time.perf_counter()
    windows = text_windows(tokenizer, "test", ppl_seq_len, ppl_samples)
    metrics["ppl"] = perplexity(model, windows, batch_size, progress)
    metrics["ppl_seconds"] = time.perf_counter() - t0
    rows: list[dict] = []
    if examples:
        texts, n_tok, secs = generate(model, tokenizer, [e.prompt for e in examples], max_new_tokens, batch_size,
                                      progress)
        metrics.update(task_scores(texts, [e.completion for e in examples], [e.source for e in examples]))
        metrics["gen_tokens_per_s"] = n_tok / secs if secs else math.nan
        metrics["gen_tokens"] = n_tok
        rows = [{"prompt": e.prompt, "reference": e.completion, "output": t} for e, t in zip(examples, texts)]
    return metrics, rows

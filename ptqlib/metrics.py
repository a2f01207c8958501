"""Task and generation metrics, each a pure function on strings (tested on hand-made cases).

- ``exact_match``: every reference field present with the same value (case- and space-insensitive).
- ``field_f1``: F1 of (field, value) pairs: precision over the predicted fields, recall over
  the reference's. An empty prediction scores 0.
- ``rouge_l``: ROUGE-L F-measure from the maintained ``rouge-score`` package.
- ``facts`` / ``fact_scores``: factual consistency. The facts of a text are its numbers and its
  capitalised names; *precision* is the share of the output's facts that occur in the source
  (an invented number lowers it), *recall* the share of the reference's facts the output kept.
  Both are micro-averaged over a set of examples (total supported / total facts), so an empty
  output invents nothing (no effect on precision) and keeps nothing (recall 0).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ptqlib.data import parse_fields
from ptqlib.text import TEXT_SOURCES

_NUMBER = re.compile(r"(?<![\w.])\d+(?:[.,]\d+)*(?![\w])")
_NAME = re.compile(r"\b[A-Z][a-zA-Z]+(?:\s+[A-Z][a-zA-Z]+)*")
_NOT_NAMES = {"The", "A", "An", "I", "We", "They", "Our", "It", "He", "She", "You", "Thanks", "This", "That",
              "Delivery", "Summarise", "In", "On", "At", "For", "And", "But", "If", "Yes", "No"}


def _norm(s: str) -> str:
    return " ".join(s.lower().split())


def exact_match(pred: str, ref: str) -> float:
    r, p = parse_fields(ref), parse_fields(pred)
    if not r:
        return float(_norm(pred) == _norm(ref))
    return float(all(_norm(p.get(k, "\0")) == _norm(v) for k, v in r.items()))


def field_f1(pred: str, ref: str) -> float:
    r = {(k, _norm(v)) for k, v in parse_fields(ref).items()}
    p = {(k, _norm(v)) for k, v in parse_fields(pred).items()}
    hit = len(r & p)
    if not hit:
        return 0.0
    prec, rec = hit / len(p), hit / len(r)
    return 2 * prec * rec / (prec + rec)


_ROUGE = None


def rouge_l(pred: str, ref: str) -> float:
    global _ROUGE
    if _ROUGE is None:
        from rouge_score import rouge_scorer

        _ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    if not pred.strip() or not ref.strip():
        return 0.0
    return _ROUGE.score(ref, pred)["rougeL"].fmeasure


def facts(text: str) -> set[str]:
    """Numbers and capitalised names (multi-word names kept whole), normalised."""
    out = {n.replace(",", "") for n in _NUMBER.findall(text)}
    for m in _NAME.findall(text):
        words = [w for w in m.split() if w not in _NOT_NAMES]
        if words:
            out.add(" ".join(words).lower())
    return out


def _supported(fact: str, source: str) -> bool:
    if fact[0].isdigit():
        return fact in {n.replace(",", "") for n in _NUMBER.findall(source)}
    return fact in _norm(source)


def fact_counts(pred: str, source: str, ref: str) -> tuple[int, int, int, int]:
    """(facts in pred, of them in source, facts in ref, of them in pred)."""
    fp, fr = facts(pred), facts(ref)
    return len(fp), sum(_supported(f, source) for f in fp), len(fr), sum(_supported(f, pred) for f in fr)


def example_scores(preds: list[str], refs: list[str], sources: list[str]) -> dict[str, list[float]]:
    """Per-example columns (one value per example, in order): what :data:`STATISTICS` aggregates.

    ``fact_pred`` / ``fact_sup`` / ``fact_ref`` / ``fact_kept`` are the counts of
    :func:`fact_counts`, kept as counts so precision and recall stay micro-averaged when
    examples are resampled.
    """
    counts = [fact_counts(p, s, r) for p, s, r in zip(preds, sources, refs)]
    return {
        "exact_match": list(map(exact_match, preds, refs)),
        "field_f1": list(map(field_f1, preds, refs)),
        "rouge_l": list(map(rouge_l, preds, refs)),
        "empty_outputs": [float(not p.strip()) for p in preds],
        "fact_pred": [float(c[0]) for c in counts],
        "fact_sup": [float(c[1]) for c in counts],
        "fact_ref": [float(c[2]) for c in counts],
        "fact_kept": [float(c[3]) for c in counts],
    }


@dataclass(frozen=True)
class Statistic:
    """How a metric is computed from per-unit columns: ``transform(sum(num) / sum(den))``.

    ``group`` names the units (``task``: held-out task examples; ``ppl`` / ``ppl_<source>``:
    perplexity windows). A mean has no ``den`` (each unit counts 1); micro-averaged ratios and
    perplexity (``exp(total NLL / total tokens)``) do. Written once so the report's numbers and
    the bootstrap over examples compute every metric the same way.
    """

    group: str
    num: str
    den: str | None = None
    exp: bool = False

    def __call__(self, num, den=None):
        value = sum(num) / (sum(den) if self.den else len(num))
        return math.exp(value) if self.exp else value


STATISTICS: dict[str, Statistic] = {
    "exact_match": Statistic("task", "exact_match"),
    "field_f1": Statistic("task", "field_f1"),
    "rouge_l": Statistic("task", "rouge_l"),
    "empty_outputs": Statistic("task", "empty_outputs"),
    "fact_precision": Statistic("task", "fact_sup", "fact_pred"),
    "fact_recall": Statistic("task", "fact_kept", "fact_ref"),
}


def ppl_statistic(metric: str) -> Statistic | None:
    """``ppl`` (pydoc) and ``ppl_<source>``: exp of the token-weighted mean NLL of their windows."""
    if metric == "ppl" or metric.startswith("ppl_") and metric != "ppl_seconds":
        return Statistic(metric, "nll", "tokens", exp=True)
    return None


def kl_statistic(metric: str) -> Statistic | None:
    """``kl`` / ``kl_<source>``: mean per-token KL(reference || model) on the windows of ``ppl`` /
    ``ppl_<source>``; ``top1_agree`` / ``top1_agree_<source>``: the share of those tokens whose most
    likely next token is the reference's (``evaluate.window_nll``)."""
    for prefix, col in (("kl", "kl"), ("top1_agree", "top1")):
        if metric == prefix or metric.startswith(prefix + "_"):
            return Statistic("ppl" + metric[len(prefix):], col, "tokens")
    return None


def statistic(metric: str) -> Statistic | None:
    """The per-unit definition of ``metric``, or None for a run-level metric (size, speed, loss)."""
    return STATISTICS.get(metric) or ppl_statistic(metric) or kl_statistic(metric)


def task_scores(preds: list[str], refs: list[str], sources: list[str]) -> dict[str, float]:
    """Mean exact match, field F1, ROUGE-L, and micro-averaged fact precision / recall."""
    if not preds:
        return {}
    cols = example_scores(preds, refs, sources)
    out = {}
    for name, st in STATISTICS.items():
        den = cols[st.den] if st.den else None
        out[name] = st(cols[st.num], den) if not den or sum(den) else math.nan
    return out


# ---- the names an evaluate stage records (what a claim compares, what a select ranks by) ---------
# run-level metrics of ptqlib.stages.evaluate: size and speed
RUN_METRICS = ("size_mb_deploy", "size_mb_stored", "model_params", "gen_tokens_per_s", "gen_seconds", "ppl_seconds",
               "ttft_s", "decode_tokens_per_s", "peak_rss_mb", "load_seconds")
PPL_METRICS = tuple("ppl" if s == "pydoc" else f"ppl_{s}" for s in TEXT_SOURCES)
KL_METRICS = tuple(f"{m}{p[len('ppl'):]}" for p in PPL_METRICS for m in ("kl", "top1_agree"))


def evaluate_metric_names() -> list[str]:
    """Every metric the evaluate stage can record, per-unit first; ``lmeval.<task>.<metric>`` last."""
    return [*PPL_METRICS, *KL_METRICS, *STATISTICS, *RUN_METRICS, "lmeval.<task>.<metric>"]


def known_evaluate_metric(metric) -> bool:
    return isinstance(metric, str) and (metric in evaluate_metric_names()[:-1]
                                        or re.fullmatch(r"lmeval\.[\w-]+\.\w+", metric) is not None)


# Declared once, read by claims, selection and plots: a time, a size, a memory peak or a loss is better lower.
LOWER_IS_BETTER = {"empty_outputs", "size_mb_deploy", "size_mb_stored", "train_seconds", "step_seconds", "peak_mem_mb",
                   "train_loss_last", "train_loss_first", "quant_seconds", "gen_seconds", "ppl_seconds", "ttft_s",
                   "load_seconds", "peak_rss_mb"}


def lower_is_better(metric: str) -> bool:
    """Perplexities, sizes, times and losses; stage-prefixed columns ("finetune.peak_mem_mb") by their name."""
    name = metric.rsplit(".", 1)[-1]
    return name in LOWER_IS_BETTER or ppl_statistic(name) is not None or name.split("_", 1)[0] == "kl"

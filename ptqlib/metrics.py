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

from ptqlib.data import parse_fields

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


def task_scores(preds: list[str], refs: list[str], sources: list[str]) -> dict[str, float]:
    """Mean exact match, field F1, ROUGE-L, and micro-averaged fact precision / recall."""
    n = len(preds)
    if n == 0:
        return {}
    counts = [fact_counts(p, s, r) for p, s, r in zip(preds, sources, refs)]
    n_pred, n_sup, n_ref, n_kept = (sum(c[i] for c in counts) for i in range(4))
    return {
        "exact_match": sum(map(exact_match, preds, refs)) / n,
        "field_f1": sum(map(field_f1, preds, refs)) / n,
        "rouge_l": sum(map(rouge_l, preds, refs)) / n,
        "fact_precision": n_sup / n_pred if n_pred else math.nan,
        "fact_recall": n_kept / n_ref if n_ref else math.nan,
        "empty_outputs": sum(not p.strip() for p in preds) / n,
    }

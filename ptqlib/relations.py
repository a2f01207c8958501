"""The relations a claim can state between two pipelines, each once: the study file's check, the verdict,
the p-values of both directions and the hypothesis in words all read :data:`RELATIONS`.

A relation is the region of the signed difference ``d`` (a - b, sign-flipped where lower is better, so
``d > 0`` means "a is better") where the claim holds, given the margin ``m = min_effect``: an open
interval ``(lower(m), upper(m))``, either end possibly infinite. With the 95% interval ``[lo, hi]`` of
``d`` the claim **holds** when ``lower < lo`` and ``hi < upper``, **does not hold** when the interval lies
wholly outside (``hi < lower`` or ``lo > upper``), and is undecided otherwise. The one-sided p-values
(``ptqlib.report.inference.p_holds`` / ``p_fails``) test the same bounds, so p < 0.025 exactly where the
interval decides. A new relation is one :func:`register` call here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

INF = math.inf


@dataclass(frozen=True)
class Relation:
    symbol: str  # as written in a study file's claim
    help: str
    bounds: Callable[[float], tuple[float, float]]  # m -> (lower, upper): holds where lower < d < upper
    words: Callable[[str, str, str, float], tuple[str, list[str]]]  # (d, a, b, m) -> hypothesis, notes

    def decide(self, lo: float, hi: float, m: float = 0.0) -> str:
        """holds / does not hold / undecided from the interval ``[lo, hi]`` of the signed difference."""
        if math.isnan(lo) or math.isnan(hi):
            return "undecided (no interval)"
        lower, upper = self.bounds(m)
        if lower < lo and hi < upper:
            return "holds"
        if hi < lower or lo > upper:
            return "does not hold"
        return "undecided (interval contains the boundary)"


RELATIONS: dict[str, Relation] = {}


def register(r: Relation) -> Relation:
    if r.symbol in RELATIONS:
        raise ValueError(f"relation {r.symbol!r} is registered twice")
    RELATIONS[r.symbol] = r
    return r


def relation(symbol: str) -> Relation:
    """The registered relation ``symbol``; a ValueError naming the valid ones otherwise."""
    if symbol not in RELATIONS:
        raise ValueError(f"relation {symbol!r}; valid: {', '.join(RELATIONS)}")
    return RELATIONS[symbol]


register(Relation(">", "a beats b by more than min_effect", lambda m: (m, INF),
                  lambda d, a, b, m: (f"{d} > {m:g}", [])))
register(Relation(">=", "a is not worse than b by more than min_effect", lambda m: (-m, INF),
                  lambda d, a, b, m: ((f"{d} > -{m:g}", [f"not worse by more than {m:g}"]) if m
                                      else (f"{d} > 0", ["no margin: as strict as '>'"]))))
register(Relation("==", "a and b differ by less than min_effect (equivalence)", lambda m: (-m, m),
                  lambda d, a, b, m: (f"|{a} - {b}| < {m:g}", [] if m else ["no margin: cannot hold"])))

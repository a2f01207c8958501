"""The fraction of a quantization loss that a method recovers, with a Fieller interval (docs/statistics.md).

For a reference ``r`` (the 16-bit model), a PTQ model ``b`` and a method on top of it ``a`` (QLoRA after PTQ,
EoRA, ...), every peer reports the recovered fraction

    R = (a - b) / (r - b)        (1: all of the PTQ loss recovered, 0: none, < 0: worse than PTQ)

and none gives an interval. A ratio of two noisy differences is not normal when its denominator is small,
so the delta method's ``R ± t se`` undercovers exactly where it matters; Fieller's construction inverts the
test of each candidate value ``R0`` instead: ``R = R0`` holds iff the linear contrast

    C(R0) = (a - b) - R0 (r - b)

is zero, and ``C(R0)`` is a paired difference of the same units and seeds, whose interval the crossed
seeds x examples model of ``ptqlib.report.inference`` already gives (influence values, Satterthwaite df). The
interval is every ``R0`` whose contrast is not rejected at 95%: bounded when ``r - b`` is itself clearly
non-zero, one- or two-sided unbounded otherwise (reported as infinite bounds). A claim "a recovers more than
a fraction m" is the contrast claim ``C(m) > 0`` (given a loss, ``r`` better than ``b``), so its p-value is that
contrast's one-sided t test, which agrees with the interval at the boundary by construction.
``tests/report/test_recovered.py`` checks coverage on simulated studies and that the delta method falls short.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import optimize, stats

from ptqlib.metrics import Statistic
from ptqlib.report.inference import LEVEL, components, effective_units, influence

LIMIT = 1e6  # |R0| searched for a bound before it is called infinite


@dataclass(frozen=True)
class Recovered:
    """The recovered fraction, its Fieller interval, and the delta method's se and df (shown, not used)."""

    fraction: float
    lo: float
    hi: float
    se: float
    df: float
    loss: float  # r - b, signed so that positive is a loss (the reference better)


class _Contrast:
    """``C(R0)`` with its se and df for any ``R0``, from the three pipelines' units (each ``(S, N)``)."""

    def __init__(self, a: tuple, b: tuple, r: tuple, st: Statistic, sign: float):
        (va, pa), (vb, pb), (vr, pr) = (influence(*x, st) for x in (a, b, r))
        self.gain, self.loss = sign * float(va - vb), sign * float(vr - vb)  # signed: positive is "better"
        self.d_gain, self.d_loss = sign * (pa - pb), sign * (pr - pb)
        self.n_eff = effective_units(np.mean([x[1] for x in (a, b, r)], axis=(0, 1)))

    def at(self, r0: float) -> tuple[float, float, float]:
        """(C(r0), se, df)."""
        seed_var, example_var, df = components(self.d_gain - r0 * self.d_loss, self.n_eff)
        return self.gain - r0 * self.loss, float(np.sqrt(seed_var + example_var)), float(df)

    def excess(self, r0: float, level: float) -> float:
        """|t(r0)| minus its critical value: <= 0 inside the interval."""
        c, se, df = self.at(r0)
        if se == 0:
            return math.inf if c else -1.0
        return abs(c) / se - stats.t.ppf(0.5 + level / 2, df)


def _bound(f, start: float, step: float, direction: float) -> float:
    """The root of ``f`` beyond ``start`` in ``direction``, where ``f(start) <= 0``; +-inf if none up to LIMIT."""
    inner = start
    while abs(inner) < LIMIT:
        outer = inner + direction * step
        if f(outer) > 0:
            return float(optimize.brentq(f, inner, outer, xtol=1e-10))
        inner, step = outer, step * 2
    return direction * math.inf


def recovered_interval(a: tuple, b: tuple, r: tuple, st: Statistic, sign: float = 1.0,
                       level: float = LEVEL) -> Recovered:
    """``R = (a - b) / (r - b)`` and its Fieller interval; ``a``, ``b``, ``r``: ``(num, den)`` unit arrays
    ``(S, N)`` paired by seed and unit (``ptqlib.report.claims``); ``sign`` -1 where lower is better (R itself
    does not change, the loss's sign does)."""
    con = _Contrast(a, b, r, st, sign)
    if con.loss == 0:
        return Recovered(math.nan, -math.inf, math.inf, math.nan, math.nan, 0.0)
    frac = con.gain / con.loss
    _, se_c, df = con.at(frac)  # the delta method: se of C(R) / |r - b|
    se = se_c / abs(con.loss)
    f = lambda r0: con.excess(r0, level)  # noqa: E731
    step = max(se, 1e-3)
    return Recovered(frac, _bound(f, frac, step, -1.0), _bound(f, frac, step, 1.0), se, df, con.loss)


def p_recovers(a: tuple, b: tuple, r: tuple, st: Statistic, boundary: float, sign: float = 1.0) -> tuple[float, float]:
    """(p of "R > boundary", p of "R < boundary"): the one-sided t tests of ``C(boundary)`` (a loss assumed)."""
    con = _Contrast(a, b, r, st, sign)
    c, se, df = con.at(boundary)
    if se == 0:
        return (0.0, 1.0) if c > 0 else (1.0, 0.0 if c < 0 else 1.0)
    return float(stats.t.sf(c / se, df)), float(stats.t.sf(-c / se, df))

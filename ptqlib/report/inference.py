"""Intervals and tests for paired claims with few seeds (see docs/statistics.md).

A claim compares pipelines a and b on S paired seeds and N paired units (task examples or
perplexity windows, the same units for every seed). The metric is ``transform(sum num / sum den)``
over a pipeline's units (``metrics.Statistic``). Each unit's *influence value* linearises it
(delta method: the metric moves by the mean influence), so means, micro-averaged ratios and
exp(mean NLL) share one model for the paired influence differences ``D[s, i]``::

    D[s, i] = a_s + b_i + e_si    (seed effect, example effect, seed x example interaction)

    Var(difference) = sigma_a^2 / S + sigma_b^2 / N + sigma_e^2 / (S N)

estimated by two mean squares: the variance of the per-seed means (``sigma_a^2 + sigma_e^2 / N``,
S - 1 degrees of freedom) and the example mean square minus the interaction mean square
(``S sigma_b^2``, many degrees of freedom). The interval is ``d ± t(df) se`` with Satterthwaite's
df. Everything is closed form: no RNG, the same numbers on every run.

Arrays may carry leading batch axes (``(..., S, N)``): the coverage test runs thousands of
simulated studies in one call.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

from ptqlib import relations
from ptqlib.metrics import Statistic

LEVEL = 0.95  # two-sided interval; its bounds are the one-sided tests at (1 - LEVEL) / 2 = 0.025


@dataclass(frozen=True)
class Interval:
    """The difference a - b, its standard error and Satterthwaite df, and the interval at ``level``.

    ``seed_var`` (``sigma_a^2/S + sigma_e^2/(SN)``) and ``example_var`` (``sigma_b^2/N``) are the
    two parts of ``se**2``. Scalars for one claim, arrays for a batch.
    """

    difference: np.ndarray | float
    se: np.ndarray | float
    df: np.ndarray | float
    lo: np.ndarray | float
    hi: np.ndarray | float
    seed_var: np.ndarray | float
    example_var: np.ndarray | float


def influence(num: np.ndarray, den: np.ndarray, st: Statistic) -> tuple[np.ndarray, np.ndarray]:
    """(value, phi): the statistic on all units (``...``) and each unit's influence value (``..., S, N``).

    For ``r = sum num / sum den``, ``phi = (num - r den) / mean(den)``: r moves by the mean of
    phi when units are reweighted (first order), and a mean's phi is its centred values. With
    ``exp`` (perplexity) the chain rule multiplies by ``exp(r)`` (delta method on the ppl scale).
    """
    num, den = np.asarray(num, float), np.asarray(den, float)
    total = den.sum(axis=(-2, -1))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = num.sum(axis=(-2, -1)) / total
        phi = (num - r[..., None, None] * den) / (total / (num.shape[-2] * num.shape[-1]))[..., None, None]
    if st.exp:
        r = np.exp(r)
        phi = phi * r[..., None, None]
    return r, phi


def effective_units(weights: np.ndarray) -> np.ndarray:
    """``n_eff = (sum w^2)^2 / sum w^4`` over the last axis: how many equal units the ``weights`` (``..., N``)
    are worth for estimating a variance. A unit's influence value scales with its weight (a document's
    summed NLL with its token count), so the example mean square is a sum of chi-squares weighted by
    ``w^2``, and Satterthwaite gives it ``n_eff - 1`` degrees of freedom; equal weights give ``N``.
    The 14 held-out documents of the default study (9 of one window, one of 8) count as 3.4."""
    w2 = np.asarray(weights, float) ** 2
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(w2.sum(-1) > 0, w2.sum(-1) ** 2 / (w2 ** 2).sum(-1), float(w2.shape[-1]))


def components(d: np.ndarray, n_eff: np.ndarray | float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(seed_var, example_var, df) of the mean of ``d`` (``..., S, N``) under the crossed model.

    ``n_eff``: the units' effective number (:func:`effective_units`; default N, equal units): the example
    and interaction mean squares get ``n_eff - 1`` and ``(S - 1)(n_eff - 1)`` degrees of freedom in place
    of ``N - 1`` and ``(S - 1)(N - 1)`` (at least 1). Unequal documents are fewer independent draws than
    their count says; with ``N - 1`` the perplexity interval over them covered 0.90 (0.86 with skewed
    document effects), with ``n_eff - 1`` 0.99 (0.96): ``tests/report/test_coverage.py``.

    seed_var = max(var of the per-seed means / S, MS_e / (S N)): the per-seed means carry
    sigma_a^2/S + sigma_e^2/(SN) on only S - 1 df; their part sigma_e^2/(SN) is also known from the
    interaction mean square MS_e on (S-1)(N-1) df, so that is a floor (a positive-part estimate of
    sigma_a^2; without it a seed spread small by chance gives a narrow interval).
    example_var = max(MS_examples - MS_e, 0) / (S N), the shared example part sigma_b^2/N.
    df: Satterthwaite, the seed part counted with S - 1 df even when floored (conservative).
    S = 1: only the example part exists (seed variance is not estimable), df N - 1.
    N = 1 (run-level metrics): a t interval over the per-seed differences, df S - 1.
    """
    S, N = d.shape[-2:]
    dfn = np.maximum(np.broadcast_to(N if n_eff is None else n_eff, d.shape[:-2]) - 1.0, 1.0)  # the units' df
    if S == 1:
        ex = d[..., 0, :].var(axis=-1, ddof=1) / N if N > 1 else np.zeros(d.shape[:-2])
        return np.zeros_like(ex), ex, np.array(dfn if N > 1 else np.zeros(ex.shape), float)
    seed_means = d.mean(axis=-1)
    seed_var = seed_means.var(axis=-1, ddof=1) / S  # E = sigma_a^2/S + sigma_e^2/(SN)
    if N == 1:
        return seed_var, np.zeros_like(seed_var), np.full(seed_var.shape, S - 1.0)
    ex_means = d.mean(axis=-2)
    ms_b = S * ex_means.var(axis=-1, ddof=1)  # E = sigma_e^2 + S sigma_b^2, N - 1 df
    resid = d - seed_means[..., None] - ex_means[..., None, :] + d.mean(axis=(-2, -1))[..., None, None]
    ms_e = (resid ** 2).sum(axis=(-2, -1)) / ((S - 1) * (N - 1))  # E = sigma_e^2
    seed_var = np.maximum(seed_var, ms_e / (S * N))
    example_var = np.maximum(ms_b - ms_e, 0.0) / (S * N)
    # Satterthwaite: each mean square's (weight x value)^2 over its df
    spread = seed_var ** 2 / (S - 1) + np.where(
        example_var > 0, (ms_b / (S * N)) ** 2 / dfn + (ms_e / (S * N)) ** 2 / ((S - 1) * dfn), 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        df = (seed_var + example_var) ** 2 / spread
    return seed_var, example_var, df


def paired_interval(num_a: np.ndarray, den_a: np.ndarray, num_b: np.ndarray, den_b: np.ndarray, st: Statistic,
                    level: float = LEVEL, exact: bool = False) -> Interval:
    """``st(a) - st(b)`` on all units with its crossed-model t interval (inputs ``..., S, N``).

    ``exact``: the runs have no variance to estimate (one seed of pipelines that do not train,
    a run-level metric): the interval is the point.
    """
    if not 0 < level < 1:
        raise ValueError(f"level {level!r}: must be in (0, 1), e.g. 0.95")
    va, pa = influence(num_a, den_a, st)
    vb, pb = influence(num_b, den_b, st)
    if pa.shape != pb.shape:
        raise ValueError(f"unpaired units: a has shape {pa.shape}, b {pb.shape}; both must be (seeds, units)")
    diff = va - vb
    S, N = pa.shape[-2:]
    if exact or S * N == 1:  # nothing to estimate a variance from: the point, or no interval
        zero = np.zeros_like(diff)
        if exact:
            return Interval(diff, zero, np.full_like(diff, math.inf), diff, diff, zero, zero)
        nan = np.full_like(diff, math.nan)
        return Interval(diff, nan, nan, nan, nan, nan, nan)
    weights = (np.asarray(den_a, float) + np.asarray(den_b, float)).mean(axis=-2)  # (..., N): a unit's size
    seed_var, example_var, df = components(pa - pb, effective_units(weights))
    se = np.sqrt(seed_var + example_var)
    half = np.where(se > 0, stats.t.ppf(0.5 + level / 2, np.where(se > 0, df, 1.0)) * se, 0.0)
    return Interval(diff, se, df, diff - half, diff + half, seed_var, example_var)


def p_holds(relation: str, signed: float, se: float, df: float, min_effect: float = 0.0) -> float:
    """One-sided p-value of "the claim holds" against its boundary (``signed``: a - b, sign-flipped
    where lower is better), from the relation's bounds (``ptqlib.relations``): ``>``: H0 d <= m; ``>=``:
    H0 d <= -m; ``==``: TOST, the larger of the p-values of H0 d <= -m and H0 d >= m. p < 0.025 exactly
    when the 95% interval decides "holds"."""
    lower, upper = relations.relation(relation).bounds(min_effect)
    if math.isnan(signed) or math.isnan(se):
        return math.nan
    ps = [_p_beyond(signed, se, df, lower, 1.0)] if lower > -math.inf else []
    ps += [_p_beyond(signed, se, df, upper, -1.0)] if upper < math.inf else []
    return max(ps)


def p_fails(relation: str, signed: float, se: float, df: float, min_effect: float = 0.0) -> float:
    """One-sided p-value of "the claim does not hold", the reverse of :func:`p_holds`: ``>``: H0 d >= m;
    ``>=``: H0 d >= -m; ``==``: the smaller of H0 d <= m and H0 d >= -m (outside the margin on either
    side). p < 0.025 exactly when the 95% interval decides "does not hold"."""
    lower, upper = relations.relation(relation).bounds(min_effect)
    if math.isnan(signed) or math.isnan(se):
        return math.nan
    ps = [_p_beyond(signed, se, df, lower, -1.0)] if lower > -math.inf else []
    ps += [_p_beyond(signed, se, df, upper, 1.0)] if upper < math.inf else []
    return min(ps)


def _p_beyond(signed: float, se: float, df: float, bound: float, side: float) -> float:
    """p of H0 "d <= bound" (``side`` +1: evidence that d is above it) or "d >= bound" (-1: below it)."""
    t = side * (signed - bound)
    if se == 0:  # an exact difference: rejected iff strictly beyond the bound
        return 0.0 if t > 0 else 1.0
    return float(stats.t.sf(t / se, df))


def holm(p: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values; NaN (a claim not tested) stays NaN and is not counted."""
    idx = [i for i, v in enumerate(p) if not math.isnan(v)]
    order = sorted(idx, key=lambda i: p[i])
    out = [math.nan] * len(p)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p[i]))  # monotone in the sorted order
        out[i] = running
    return out

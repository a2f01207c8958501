"""Coverage of the claims interval on simulated studies whose true difference is known.

Each simulated study: N = 128 examples, S paired seeds. Per-example scores in [0, 1] resemble
field F1 (U-shaped Beta draws with example-dependent means: most near 0 or 1); pipeline a is
better by DELTA on average but better on some examples and worse on others (a shared example
component, the part a seed-only interval misses); each run (pipeline x seed) is shifted by a
seed effect whose SD is a multiple of the example-level SE of one seed's difference. The
interval must contain DELTA in >= 93% of the studies in every setting. The old seed-resampling
bootstrap (``claims.paired_bootstrap``) must fall below 90% at 5x, so the test tells them apart.
Fixed RNG seeds: the numbers are the same on every run (docs/statistics.md quotes them).
"""
import numpy as np
import pytest

from ptqlib.metrics import Statistic
from ptqlib.report.claims import paired_bootstrap
from ptqlib.report.inference import paired_interval

N, DELTA, STUDIES = 128, 0.02, 2000
MEAN = Statistic("task", "field_f1")


def simulate(rng: np.random.Generator, studies: int, seeds: int, seed_sd_x: float) -> tuple[np.ndarray, np.ndarray]:
    """(scores_a, scores_b), each (studies, seeds, N); E[mean(a) - mean(b)] = DELTA exactly."""
    base = rng.uniform(0.35, 0.6, (studies, 1, N))  # example difficulty, shared by a and b
    shared = rng.uniform(-0.3, 0.3, (studies, 1, N))  # a's example-specific edge, the same for every seed
    mu_a, mu_b = (np.broadcast_to(m, (studies, seeds, N)) for m in (base + DELTA + shared, base))
    a, b = rng.beta(mu_a, 1 - mu_a), rng.beta(mu_b, 1 - mu_b)  # Beta(mu, 1 - mu): mean mu, mass near 0 and 1
    example_se = np.sqrt((a - b).var(axis=-1, ddof=1).mean() / N)  # SE of one seed's difference
    run_sd = seed_sd_x * example_se / np.sqrt(2)  # the difference's seed SD is seed_sd_x x example_se
    return a + rng.normal(0, run_sd, (studies, seeds, 1)), b + rng.normal(0, run_sd, (studies, seeds, 1))


def coverage_new(a: np.ndarray, b: np.ndarray, st: Statistic = MEAN, den=None, truth: float = DELTA) -> float:
    den = np.ones_like(a) if den is None else den
    iv = paired_interval(a * den, den, b * den, den, st)  # all studies at once (leading batch axis)
    return float(np.mean((iv.lo < truth) & (truth < iv.hi)))


def coverage_old(a: np.ndarray, b: np.ndarray, studies: int = 1000) -> float:
    one = np.ones_like(a[0])
    hits = [lo < DELTA < hi for lo, hi in
            (paired_bootstrap(a[i], one, b[i], one, MEAN, n_boot=250, seed=i)[1:] for i in range(studies))]
    return float(np.mean(hits))


@pytest.mark.parametrize("seeds", [3, 5])
@pytest.mark.parametrize("seed_sd_x", [0, 1, 2, 5])
def test_interval_covers_with_few_seeds(seeds, seed_sd_x):
    a, b = simulate(np.random.default_rng(100 * seeds + seed_sd_x), STUDIES, seeds, seed_sd_x)
    cov = coverage_new(a, b)
    print(f"S={seeds} seed SD {seed_sd_x}x: coverage {cov:.3f}")
    assert cov >= 0.93
    if seed_sd_x == 5:  # the old bootstrap resamples 3-5 seeds: it misses much of their spread
        old = coverage_old(a, b)
        print(f"S={seeds} seed SD {seed_sd_x}x: old bootstrap {old:.3f}")
        assert old < 0.90


@pytest.mark.parametrize("seed_sd_x", [0, 5])
def test_micro_averaged_ratio_covers(seed_sd_x):
    """fact_precision-like: sum(supported) / sum(predicted), a varying count per example and seed."""
    rng = np.random.default_rng(7 + seed_sd_x)
    a, b = simulate(rng, STUDIES, 3, seed_sd_x)
    den = 1.0 + rng.poisson(3, a.shape)  # independent of the scores: the ratio's truth is still DELTA
    assert coverage_new(a, b, Statistic("task", "fact_sup", "fact_pred"), den) >= 0.93


@pytest.mark.parametrize("seed_sd_x", [0, 5])
def test_perplexity_covers(seed_sd_x):
    """exp(total NLL / tokens) over 32 windows: a's per-token NLL is 0.02 lower on average, so the
    true difference is exp(3.08) - exp(3.10) (the delta method on the perplexity scale)."""
    rng = np.random.default_rng(11 + seed_sd_x)
    windows, seeds = 32, 3
    level = rng.uniform(2.8, 3.4, (STUDIES, 1, windows))
    shared = rng.uniform(-0.05, 0.05, (STUDIES, 1, windows))  # windows where a gains more, for every seed
    nll_a = level - 0.02 + shared + rng.normal(0, 0.05, (STUDIES, seeds, windows))
    nll_b = level + rng.normal(0, 0.05, (STUDIES, seeds, windows))
    run_sd = seed_sd_x * np.sqrt((nll_a - nll_b).var(axis=-1, ddof=1).mean() / windows) / np.sqrt(2)
    nll_a = nll_a + rng.normal(0, run_sd, (STUDIES, seeds, 1))
    nll_b = nll_b + rng.normal(0, run_sd, (STUDIES, seeds, 1))
    tokens = np.full_like(nll_a, 255.0)
    truth = np.exp(3.1 - 0.02) - np.exp(3.1)
    assert coverage_new(nll_a, nll_b, Statistic("ppl", "nll", "tokens", exp=True), tokens, truth) >= 0.93

"""Confidence intervals for accuracies and their differences, by bootstrap over test items.

Each method is scored on the same items, so a comparison is paired: resampling items (with replacement) keeps
each item's outcomes for both methods together, and the spread of the mean difference over resamples gives its
95 % interval. An item's outcome may be fractional: correctness averaged over seeds or over clients.
Written with numpy because the statistic is two lines; scipy.stats.bootstrap would add scipy for it.
"""

from __future__ import annotations

import numpy as np


def item_outcomes(correct: list[str]) -> np.ndarray:
    """Per-item correctness averaged over runs (seeds, clients), from "0101..." strings of equal length."""
    if not correct or len({len(c) for c in correct}) != 1:
        raise ValueError(f"need one or more correctness strings of one length, got lengths {[len(c) for c in correct]}")
    return np.array([[ch == "1" for ch in c] for c in correct], dtype=float).mean(0)


def _resampled_means(values: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(resamples, len(values)))
    return values[idx].mean(1)


def bootstrap_ci(outcomes: np.ndarray, resamples: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile interval of the mean accuracy over resampled items."""
    means = _resampled_means(np.asarray(outcomes, dtype=float), resamples, seed)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def bootstrap_ratio_ci(numerator: np.ndarray, denominator: np.ndarray, resamples: int = 10_000,
                       seed: int = 0) -> tuple[float, float]:
    """95 % percentile interval of sum(numerator) / sum(denominator) over resampled items: a corpus-level ratio
    such as the mean token NLL (summed NLL over summed tokens), whose exponent is perplexity."""
    num, den = np.asarray(numerator, dtype=float), np.asarray(denominator, dtype=float)
    idx = np.random.default_rng(seed).integers(0, len(num), size=(resamples, len(num)))
    lo, hi = np.percentile(num[idx].sum(1) / den[idx].sum(1), [2.5, 97.5])
    return float(lo), float(hi)


def paired_distribution(a: np.ndarray, b: np.ndarray, resamples: int = 10_000, seed: int = 0) -> np.ndarray:
    """Bootstrap distribution of the mean of a - b over resampled items (paired: an item keeps both scores), as
    `holm_intervals` takes it, for scores that are not counts (token F1, NLL)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired comparison needs the same items, got {a.shape} and {b.shape}")
    return _resampled_means(a - b, resamples, seed)


def paired_difference(a: np.ndarray, b: np.ndarray, resamples: int = 10_000,
                      seed: int = 0) -> tuple[float, tuple[float, float], bool]:
    """Mean accuracy of a minus b on the same items, its paired-bootstrap 95 % interval, and whether that
    interval excludes zero."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired comparison needs the same items, got {a.shape} and {b.shape}")
    lo, hi = bootstrap_ci(a - b, resamples, seed)
    return float((a - b).mean()), (lo, hi), bool(lo > 0 or hi < 0)


def seed_item_difference(a_runs: np.ndarray, b_runs: np.ndarray, resamples: int = 10_000, seed: int = 0,
                         a_clients: int = 1, b_clients: int = 1) -> tuple[float, np.ndarray]:
    """Mean accuracy of a minus b on the same items, and its bootstrap distribution resampling seeds and items
    together: each resample draws a's runs and b's runs (seeds) with replacement, then items with replacement.
    `a_runs` [S_a, N], `b_runs` [S_b, N] hold per run and item how many of its `a_clients` / `b_clients` models
    (1, or one per client for per-client rows) got the item right. The resampled values are exact rationals kept
    as integers (the difference scaled by S_a * a_clients * S_b * b_clients * N), so a bound at zero is exactly
    zero: no verdict can rest on a rounding error."""
    a_runs, b_runs = np.asarray(a_runs, dtype=np.int64), np.asarray(b_runs, dtype=np.int64)
    if a_runs.ndim != 2 or b_runs.ndim != 2 or a_runs.shape[1] != b_runs.shape[1]:
        raise ValueError(f"paired comparison needs [runs, items] arrays on the same items, got {a_runs.shape} "
                         f"and {b_runs.shape}")
    (sa, n), sb = a_runs.shape, b_runs.shape[0]
    wa, wb = sb * b_clients, sa * a_clients  # each side's counts onto the common denominator
    rng = np.random.default_rng(seed)
    scaled = np.empty(resamples, dtype=np.int64)
    for r in range(resamples):
        ra = a_runs[rng.integers(0, sa, sa)].sum(0)  # per item: correct count over the drawn seeds
        rb = b_runs[rng.integers(0, sb, sb)].sum(0)
        items = rng.integers(0, n, n)
        scaled[r] = (ra[items] * wa - rb[items] * wb).sum()
    denominator = sa * a_clients * sb * b_clients * n
    diff = float((a_runs.sum(0) * wa - b_runs.sum(0) * wb).sum() / denominator)
    return diff, scaled


def holm_intervals(distributions: list[np.ndarray], alpha: float = 0.05) -> list[dict]:
    """Holm's step-down over a family of claims, each given by its bootstrap distribution of a difference (as
    integers from `seed_item_difference`, or floats). A claim's two-sided p is twice the smaller tail share at
    zero; sorted by p, the j-th smallest (j = 0, 1, ...) is tested at alpha / (m - j) and is significant only if
    every smaller one was. Each claim's interval is its percentile interval at its own Holm level, so the interval
    excludes zero exactly when the claim is significant (barring a rejection stopped by an earlier claim)."""
    m = len(distributions)
    p = [min(1.0, 2 * min(np.mean(d <= 0), np.mean(d >= 0))) for d in distributions]
    out: list[dict] = [{} for _ in range(m)]
    going = True
    for j, i in enumerate(sorted(range(m), key=lambda i: p[i])):
        level = alpha / (m - j)
        lo, hi = np.percentile(distributions[i], [100 * level / 2, 100 * (1 - level / 2)], method="nearest")
        going = going and bool(lo > 0 or hi < 0)
        out[i] = {"p": p[i], "holm_alpha": level, "interval": [lo, hi], "significant": going}
    return out

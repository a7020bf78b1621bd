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


def paired_difference(a: np.ndarray, b: np.ndarray, resamples: int = 10_000,
                      seed: int = 0) -> tuple[float, tuple[float, float], bool]:
    """Mean accuracy of a minus b on the same items, its paired-bootstrap 95 % interval, and whether that
    interval excludes zero."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired comparison needs the same items, got {a.shape} and {b.shape}")
    lo, hi = bootstrap_ci(a - b, resamples, seed)
    return float((a - b).mean()), (lo, hi), bool(lo > 0 or hi < 0)

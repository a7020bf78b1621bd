import numpy as np
import pytest

from fedcollm.stats import bootstrap_ci, item_outcomes, paired_difference


def test_item_outcomes_average_runs_item_by_item():
    np.testing.assert_allclose(item_outcomes(["110", "100"]), [1.0, 0.5, 0.0])
    with pytest.raises(ValueError, match="one length"):
        item_outcomes(["10", "1"])


def test_interval_of_a_mean_accuracy_matches_the_normal_approximation():
    outcomes = np.array([1.0] * 600 + [0.0] * 400)  # p = 0.6, n = 1000: se = sqrt(.24/1000) = 0.0155
    lo, hi = bootstrap_ci(outcomes)
    assert lo < 0.6 < hi
    assert abs((hi - lo) / 2 - 1.96 * 0.0155) < 0.003


def test_pairing_detects_a_small_consistent_gain_that_unpaired_intervals_would_not():
    rng = np.random.default_rng(1)
    b = (rng.random(1000) < 0.5).astype(float)
    a = b.copy()
    a[np.flatnonzero(b == 0)[:30]] = 1.0  # a fixes 30 items b got wrong and breaks none: +3 points
    diff, (lo, hi), significant = paired_difference(a, b)
    assert diff == pytest.approx(0.03)
    assert significant and 0 < lo < 0.03 < hi
    ci_a, ci_b = bootstrap_ci(a), bootstrap_ci(b)
    assert ci_a[0] < ci_b[1]  # the two marginal intervals overlap


def test_a_difference_of_noise_is_not_significant():
    rng = np.random.default_rng(2)
    a, b = (rng.random(500) < 0.5).astype(float), (rng.random(500) < 0.5).astype(float)
    diff, (lo, hi), significant = paired_difference(a, b)
    assert lo < diff < hi
    assert significant == (lo > 0 or hi < 0)
    with pytest.raises(ValueError, match="same items"):
        paired_difference(a, b[:10])

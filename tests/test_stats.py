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


def test_seed_item_bootstrap_is_exact_and_wider_when_seeds_disagree():
    from fedcollm.stats import seed_item_difference

    rng = np.random.default_rng(3)
    b = (rng.random((3, 400)) < 0.5).astype(int)
    same = b.copy()
    diff, scaled = seed_item_difference(same, b, 2000)
    assert diff == 0 and scaled.dtype == np.int64  # integers: a tie is exactly zero, never 4.7e-21
    # a gains 4 points in one seed and none in the others: items alone would see a steady +1.3 points
    a = b.copy()
    a[0, np.flatnonzero(b[0] == 0)[:16]] = 1
    diff, scaled = seed_item_difference(a, b, 2000)
    assert diff == pytest.approx(16 / 1200)
    spread_seeds = np.percentile(scaled / (9 * 400), [2.5, 97.5])
    _, (lo, hi), _ = paired_difference(item_outcomes(["".join(map(str, r)) for r in a]),
                                       item_outcomes(["".join(map(str, r)) for r in b]), 2000)
    assert spread_seeds[0] <= 0 < lo  # resampling seeds exposes that the gain rests on one seed
    # per-client rows: counts out of the clients of each seed
    diff, _ = seed_item_difference(np.array([[2, 4]]), np.array([[1, 1]]), 10, a_clients=4)
    assert diff == pytest.approx(((0.5 - 1) + (1 - 1)) / 2)


def test_holm_tests_the_smallest_p_at_alpha_over_m_and_stops_at_the_first_failure():
    from fedcollm.stats import holm_intervals

    rng = np.random.default_rng(0)
    strong = rng.normal(0.05, 0.01, 10_000)  # p = 0
    edge = rng.normal(0.02, 0.01, 10_000)  # p about 0.045: significant alone, not at alpha / 2
    null = rng.normal(0.0, 0.01, 10_000)
    out = holm_intervals([null, strong, edge])
    assert [o["holm_alpha"] for o in out] == [0.05, 0.05 / 3, 0.05 / 2]
    assert [o["significant"] for o in out] == [False, True, False]
    assert out[2]["interval"][0] < 0 < np.percentile(edge, 2.5)  # its Holm interval is wider than the plain 95 %


def test_ratio_interval_brackets_the_corpus_ratio_and_paired_distribution_centres_on_the_difference():
    from fedcollm.stats import bootstrap_ratio_ci, paired_distribution

    rng = np.random.default_rng(1)
    tokens = rng.integers(1, 20, 300).astype(float)
    nll = tokens * rng.uniform(1.0, 3.0, 300)
    lo, hi = bootstrap_ratio_ci(nll, tokens)
    assert lo < nll.sum() / tokens.sum() < hi and hi - lo < 0.3
    a, b = rng.uniform(0, 1, 400), rng.uniform(0, 1, 400)
    dist = paired_distribution(a + 0.1, a)  # the same items shifted: no spread at all
    assert np.allclose(dist, 0.1)
    dist = paired_distribution(a, b)
    assert abs(dist.mean() - (a - b).mean()) < 0.01
    with pytest.raises(ValueError, match="same items"):
        paired_distribution(a, b[:10])


def test_the_report_gives_each_gain_its_paired_interval_over_the_same_items():
    from fedcollm.report import _verdicts, paired_differences

    block = lambda correct: {"arc_easy": {"acc": correct.count("1") / len(correct), "correct": correct}}  # noqa: E731
    ours, theirs = "1101101111" * 20, "1001001011" * 20  # 160 vs 100 right of 200: +30 points
    finals = {"fedcollm": {"llm": block(ours), "slm": block(ours)},
              "zero_shot": {"llm": block(theirs), "slm": block(theirs)},
              "standalone": {"slm": {}, "slm_clients": {"client_0": block(ours), "client_1": block(theirs)}}}
    paired = paired_differences(finals, ["arc_easy"])
    llm = paired["llm"]["zero_shot"]["arc_easy"]
    assert llm["n"] == 200 and llm["difference"] == pytest.approx(0.30)
    assert 0 < llm["ci95"][0] < 0.30 < llm["ci95"][1]
    assert paired["slm"]["standalone"]["arc_easy"]["difference"] == pytest.approx(0.15)  # mean over its clients
    results = {"tasks": ["arc_easy"], "paired": paired,
               "llm": {m: {"arc_easy": f["llm"]["arc_easy"]["acc"]} for m, f in finals.items() if "llm" in f}}
    line = _verdicts(results, "llm")[0]
    assert "+30.0 points" in line and f"[{100 * llm['ci95'][0]:+.1f}, {100 * llm['ci95'][1]:+.1f}] on 200 items" in line

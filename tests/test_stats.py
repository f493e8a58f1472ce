"""Rank correlations with bootstrap intervals, against scipy."""

import math

import numpy as np
import pytest
from scipy import stats

from manifold_ext.stats import rank_correlation, within_seed_correlation


def _data(n, noise, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    return x, x + noise * rng.normal(size=n)


def test_matches_scipy_with_ties():
    x, y = _data(30, 1.0)
    x = np.round(x, 1)  # ties
    c = rank_correlation(x, y, metric="m", n_boot=200)
    assert c.spearman == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert c.kendall == pytest.approx(stats.kendalltau(x, y).statistic, abs=1e-12)
    assert c.n == 30 and c.metric == "m" and c.level == 0.95


def test_interval_contains_estimate_narrows_with_data_and_is_deterministic():
    small = rank_correlation(*_data(12, 1.0), n_boot=300, seed=1)
    large = rank_correlation(*_data(200, 1.0), n_boot=300, seed=1)
    for c in (small, large):
        assert -1 <= c.spearman_ci[0] <= c.spearman <= c.spearman_ci[1] <= 1
        assert -1 <= c.kendall_ci[0] <= c.kendall <= c.kendall_ci[1] <= 1
    width = lambda ci: ci[1] - ci[0]
    assert width(large.spearman_ci) < width(small.spearman_ci) / 2
    assert rank_correlation(*_data(12, 1.0), n_boot=300, seed=1) == small
    assert rank_correlation(*_data(12, 1.0), n_boot=300, seed=2).spearman_ci != small.spearman_ci


def test_clusters_are_resampled_whole():
    x, y = _data(8, 1.0)
    rx, ry = np.repeat(x, 5), np.repeat(y, 5)  # five identical "seeds" per candidate
    labels = np.repeat(np.arange(8), 5)
    naive = rank_correlation(rx, ry, n_boot=400)
    clustered = rank_correlation(rx, ry, groups=labels, n_boot=400)
    assert clustered.spearman == naive.spearman
    w = lambda ci: ci[1] - ci[0]
    assert w(clustered.spearman_ci) > 1.5 * w(naive.spearman_ci)  # pseudo-replication hidden


def test_minus_infinity_ranks_lowest_and_nan_pairs_are_dropped():
    c = rank_correlation([-math.inf, 1.0, 2.0, math.nan, 3.0], [0.0, 1.0, 2.0, 5.0, 3.0], n_boot=50)
    assert c.n == 4 and c.spearman == pytest.approx(1.0) and c.kendall == pytest.approx(1.0)


def test_no_variation_is_nan():
    c = rank_correlation([1.0, 1.0, 1.0], [0.0, 1.0, 2.0], n_boot=20)
    assert math.isnan(c.spearman) and math.isnan(c.kendall) and math.isnan(c.spearman_ci[0])


@pytest.mark.parametrize("kwargs,msg", [
    ({"values": [1, 2], "gains": [1, 2, 3]}, r"values and gains must be 1-D of one length, got shapes \(2,\) and \(3,\)"),
    ({"groups": [0, 1]}, r"groups must have one label per value \(3\), got 2"),
    ({"n_boot": 0}, "n_boot must be at least 1, got 0"),
    ({"level": 1.0}, r"level must be in \(0, 1\), got 1.0"),
])
def test_errors(kwargs, msg):
    args = {"values": [1.0, 2.0, 3.0], "gains": [1.0, 3.0, 2.0], **kwargs}
    with pytest.raises(ValueError, match=msg):
        rank_correlation(args.pop("values"), args.pop("gains"), **args)


def test_vectorised_bootstrap_equals_the_loop():
    from manifold_ext.stats import _rho_tau, _rho_tau_batch
    rng = np.random.default_rng(0)
    X = np.round(rng.normal(size=(40, 25)), 1)  # ties
    Y = X + rng.normal(size=(40, 25))
    Y[3] = 1.0  # no variation: NaN both ways
    batch = _rho_tau_batch(X, Y)
    loop = np.array([_rho_tau(X[i], Y[i]) for i in range(40)])
    np.testing.assert_allclose(batch, loop, rtol=0, atol=1e-12)
    assert np.isnan(batch[3]).all()


def test_unequal_clusters_take_the_general_path():
    x, y = _data(20, 1.0)
    labels = [0] * 5 + list(range(1, 16))  # one big cluster, the rest single
    c = rank_correlation(x, y, groups=labels, n_boot=200)
    assert c.spearman_ci[0] <= c.spearman <= c.spearman_ci[1]
    assert c.n == 20


def _confounded(rng):
    """Seeds shift every gain together (a weaker base gains more) and shift the metric the other
    way; within each seed the metric is noise."""
    seeds, cands, values, gains = [], [], [], []
    for s in range(3):
        for c in range(8):
            seeds.append(s), cands.append(f"c{c}")
            gains.append(10 * s + rng.normal())
            values.append(-s + 0.01 * rng.normal())
    return seeds, cands, values, gains


def test_within_seed_correlation_removes_the_seed_shift():
    seeds, cands, values, gains = _confounded(np.random.default_rng(0))
    pooled = rank_correlation(values, gains, groups=cands, n_boot=200)
    within = within_seed_correlation(values, gains, seeds, cands, n_boot=200)
    assert pooled.spearman < -0.8  # the shift, not the candidates
    per_seed = [stats.spearmanr([v for v, s in zip(values, seeds) if s == k],
                                [g for g, s in zip(gains, seeds) if s == k]).statistic for k in range(3)]
    assert within.spearman == pytest.approx(np.mean(per_seed))
    assert within.spearman_ci[0] < within.spearman < within.spearman_ci[1] and within.n == 24
    # a metric that orders the candidates as the gains do within every seed is perfect
    exact = [g - 10 * s for g, s in zip(gains, seeds)]
    assert within_seed_correlation(exact, gains, seeds, cands, n_boot=50).spearman == pytest.approx(1.0)


def test_within_seed_correlation_skips_candidates_missing_anywhere_and_ranks_inf_lowest():
    seeds = [0, 0, 0, 1, 1, 1, 1]
    cands = ["a", "b", "c", "a", "b", "c", "d"]  # d only in seed 1: dropped
    values = [-math.inf, 1.0, 2.0, -math.inf, 1.0, 2.0, 9.0]
    gains = [0.0, 1.0, 2.0, 0.0, 1.0, 2.0, -5.0]
    c = within_seed_correlation(values, gains, seeds, cands, n_boot=20)
    assert c.spearman == pytest.approx(1.0) and c.n == 6
    assert math.isnan(within_seed_correlation([1.0], [1.0], [0], ["a"], n_boot=5).spearman)
    with pytest.raises(ValueError, match="values, gains, seeds and candidates must be 1-D of one length, got 2, 2, 1 and 2"):
        within_seed_correlation([1.0, 2.0], [1.0, 2.0], [0], ["a", "b"])


def test_within_seed_correlation_by_hand():
    # Seed 0: ranks (1, 2, 3) against (1, 3, 2): 1 - 6 * 2 / (3 * 8) = 0.5. Seed 1: the same order, 1.
    seeds, cands = [0, 0, 0, 1, 1, 1], ["a", "b", "c"] * 2
    values, gains = [1, 2, 3, 3, 1, 2], [1, 3, 2, 30, 10, 20]
    assert within_seed_correlation(values, gains, seeds, cands, n_boot=20).spearman == pytest.approx(0.75)


def test_gain_signal_by_hand():
    from manifold_ext.stats import gain_signal

    # Three seeds rank three candidates alike: rank sums 3, 6, 9, so Friedman's statistic is
    # 12 / (3 * 3 * 4) * (9 + 36 + 81) - 3 * 3 * 4 = 6, chi-square with 2 degrees: p = exp(-3).
    s = gain_signal([[1, 2, 3], [4, 5, 6], [0, 1, 2]])
    assert s["friedman_p"] == pytest.approx(math.exp(-3)) and s["friedman_min_p"] == pytest.approx(math.exp(-3))
    assert s["candidate_spread"] == pytest.approx(2.0)
    assert s["seed_spread"] == pytest.approx(math.sqrt(13 / 3))  # every column: 1, 4, 0 shifted
    # No candidate differs from another within any seed: no signal at all.
    assert gain_signal([[1, 1, 1], [5, 5, 5]])["friedman_p"] == 1.0

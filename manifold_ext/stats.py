"""Rank correlations of a metric with the gains it should predict, with bootstrap intervals.

Used by the compare workflow to score every metric (manifold sizes and baselines) against the
measured gains of the candidate expansions, over several seeds.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
from scipy import stats as _st


@dataclass
class Correlation:
    """Spearman's rho and Kendall's tau-b of ``values`` with ``gains``, each with a percentile
    bootstrap interval at ``level``; ``n`` pairs used (pairs with a NaN are dropped; -inf, e.g.
    an empty manifold, ranks lowest)."""

    metric: str
    spearman: float
    spearman_ci: Tuple[float, float]
    kendall: float
    kendall_ci: Tuple[float, float]
    n: int
    level: float


def _rho_tau(x: np.ndarray, y: np.ndarray) -> Tuple[float, float]:
    if len(x) < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return math.nan, math.nan  # undefined without variation
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rx, ry = _st.rankdata(x), _st.rankdata(y)  # ranks: -inf is finite once ranked
        rho = float(np.corrcoef(rx, ry)[0, 1])
        tau = float(_st.kendalltau(rx, ry).statistic)
    return rho, tau


def _rho_tau_batch(X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Spearman's rho and Kendall's tau-b of every row pair of X and Y, shape (rows, 2); NaN
    for a row without variation. Tau-b is sum(sx * sy) / sqrt(sum(sx^2) * sum(sy^2)) over all
    pairs, sx and sy the signs of the pairwise differences."""
    rx, ry = _st.rankdata(X, axis=1), _st.rankdata(Y, axis=1)
    rx, ry = rx - rx.mean(1, keepdims=True), ry - ry.mean(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = (rx * ry).sum(1) / np.sqrt((rx * rx).sum(1) * (ry * ry).sum(1))
        sx = np.sign(X[:, :, None] - X[:, None, :])
        sy = np.sign(Y[:, :, None] - Y[:, None, :])
        tau = (sx * sy).sum((1, 2)) / np.sqrt((sx * sx).sum((1, 2)) * (sy * sy).sum((1, 2)))
    return np.stack([rho, tau], 1)


def _interval(col: np.ndarray, level: float) -> Tuple[float, float]:
    """The percentile interval of coverage ``level`` of the finite bootstrap values in ``col``."""
    col = col[np.isfinite(col)]
    if len(col) == 0:
        return math.nan, math.nan
    alpha = (1 - level) / 2 * 100
    lo, hi = np.percentile(col, [alpha, 100 - alpha])
    return float(lo), float(hi)


def rank_correlation(
    values: Sequence[float],
    gains: Sequence[float],
    *,
    metric: str = "",
    groups: Optional[Sequence] = None,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> Correlation:
    """Spearman and Kendall correlation of a metric with the gains, with bootstrap intervals.

    Args:
        values: the metric, one value per (candidate, seed) pair.
        gains: the measured gain of each pair.
        metric: a name to carry along.
        groups: optional cluster labels (e.g. the candidate of each pair): the bootstrap then
            resamples whole clusters, so seeds of one candidate are not treated as independent.
        n_boot: bootstrap resamples.
        level: coverage of the percentile intervals.
        seed: seeds the resampling.

    Returns:
        :class:`Correlation`; NaN where a correlation is undefined (fewer than 2 pairs, or no
        variation).
    """
    x = np.asarray(values, dtype=np.float64)
    y = np.asarray(gains, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"values and gains must be 1-D of one length, got shapes {x.shape} and {y.shape}")
    if groups is not None and len(groups) != len(x):
        raise ValueError(f"groups must have one label per value ({len(x)}), got {len(groups)}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep], y[keep]
    labels = np.asarray(groups, dtype=object)[keep] if groups is not None else np.arange(len(x))
    clusters = [np.flatnonzero(labels == u) for u in dict.fromkeys(labels.tolist())]
    rho, tau = _rho_tau(x, y)
    rng = np.random.default_rng(seed)
    boots = np.full((n_boot, 2), np.nan)
    if len(clusters) >= 2:
        picks = rng.integers(0, len(clusters), (n_boot, len(clusters)))
        # Ranks are finite (-inf included) and change neither correlation.
        rx, ry = _st.rankdata(x), _st.rankdata(y)
        if len({len(c) for c in clusters}) == 1:  # equal clusters: every resample as long
            members = np.stack(clusters)  # (clusters, size)
            idx = members[picks].reshape(n_boot, -1)
            for b0 in range(0, n_boot, 256):
                boots[b0:b0 + 256] = _rho_tau_batch(rx[idx[b0:b0 + 256]], ry[idx[b0:b0 + 256]])
        else:
            for i in range(n_boot):
                idx = np.concatenate([clusters[j] for j in picks[i]])
                boots[i] = _rho_tau(rx[idx], ry[idx])

    return Correlation(metric=metric, spearman=rho, spearman_ci=_interval(boots[:, 0], level), kendall=tau,
                       kendall_ci=_interval(boots[:, 1], level), n=int(len(x)), level=level)


def gain_signal(gains: Sequence[Sequence[float]]) -> dict:
    """Whether the candidates' gains differ beyond the seed spread.

    Args:
        gains: ``gains[s][c]``, the gain of candidate ``c`` at seed ``s`` (every seed has every
            candidate).

    Returns:
        A dict of plain floats (None where undefined):

        * ``friedman_p``: the p-value of Friedman's test with the seeds as blocks and the
          candidates as treatments (the chi-square approximation; needs at least 2 seeds and 3
          candidates). Seeds shift every candidate's gain together; ranking within each seed
          removes that shift. When every seed ties every candidate, there is no difference to
          detect and the p-value is 1.
        * ``friedman_min_p``: the smallest p-value the test can reach with this many seeds and
          candidates (every seed ranking the candidates alike); above 0.05, no ranking can be
          significant whatever the gains.
        * ``candidate_spread``: max minus min of the candidates' mean gains.
        * ``seed_spread``: the mean over candidates of the standard deviation of the gain across
          seeds (needs at least 2 seeds).
    """
    g = np.asarray(gains, dtype=np.float64)
    if g.ndim != 2 or g.size == 0:
        raise ValueError(f"gains must be a non-empty (seeds, candidates) table, got shape {g.shape}")
    n, k = g.shape
    means = g.mean(0)
    out = {"friedman_p": None, "friedman_min_p": None,
           "candidate_spread": float(means.max() - means.min()),
           "seed_spread": float(g.std(0, ddof=1).mean()) if n >= 2 else None}
    if n >= 2 and k >= 3:
        with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
            warnings.simplefilter("ignore")
            p = float(_st.friedmanchisquare(*g.T).pvalue)
        out["friedman_p"] = 1.0 if math.isnan(p) else p
        out["friedman_min_p"] = float(_st.chi2.sf(n * (k - 1), k - 1))
    return out


def within_seed_correlation(
    values: Sequence[float],
    gains: Sequence[float],
    seeds: Sequence,
    candidates: Sequence,
    *,
    metric: str = "",
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> Correlation:
    """Spearman and Kendall correlation of a metric with the gains computed within each seed (over
    that seed's candidates) and averaged over the seeds, with bootstrap intervals over candidates.

    A seed whose base is weaker gives every candidate larger gains and shifts the metrics too;
    pooling the seeds then correlates that shift, not the candidates' order. Within a seed, the
    base, the data order and the threshold are shared, so only the candidates differ.

    Args:
        values, gains: one per (seed, candidate) unit.
        seeds, candidates: the unit's seed and candidate labels. A candidate is used only if every
            seed has it with a metric and a gain that are not NaN (-inf, an empty manifold, ranks
            lowest).
        metric, n_boot, level, seed: as :func:`rank_correlation`. Each bootstrap resample draws
            the candidates with replacement, the same draw in every seed, and averages the seeds'
            correlations on it.

    Returns:
        :class:`Correlation`, ``n`` the number of units used; NaN when no seed has at least 2
        candidates with variation in both the metric and the gain.
    """
    x = np.asarray(values, dtype=np.float64)
    y = np.asarray(gains, dtype=np.float64)
    if not (len(x) == len(y) == len(seeds) == len(candidates)) or x.ndim != 1:
        raise ValueError(f"values, gains, seeds and candidates must be 1-D of one length, got "
                         f"{len(x)}, {len(y)}, {len(seeds)} and {len(candidates)}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    seed_ids = list(dict.fromkeys(seeds))
    cand_ids = list(dict.fromkeys(candidates))
    X = np.full((len(seed_ids), len(cand_ids)), np.nan)
    Y = np.full_like(X, np.nan)
    si = {s: i for i, s in enumerate(seed_ids)}
    ci = {c: i for i, c in enumerate(cand_ids)}
    for v, g, s, c in zip(x, y, seeds, candidates):
        X[si[s], ci[c]], Y[si[s], ci[c]] = v, g
    keep = ~(np.isnan(X) | np.isnan(Y)).any(0)
    X, Y = X[:, keep], Y[:, keep]
    # Ranks within each seed: -inf becomes finite and neither correlation changes.
    RX, RY = _st.rankdata(X, axis=1), _st.rankdata(Y, axis=1)

    def mean_over_seeds(rx: np.ndarray, ry: np.ndarray) -> np.ndarray:
        """``(..., 2)``: the seeds' mean (rho, tau) for ranks of shape (seeds, ..., candidates)."""
        per = np.stack([_rho_tau_batch(rx[s].reshape(-1, rx.shape[-1]), ry[s].reshape(-1, ry.shape[-1]))
                        for s in range(rx.shape[0])])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return np.nanmean(per, 0)

    k = X.shape[1]
    point = mean_over_seeds(RX[:, None], RY[:, None])[0] if k >= 2 else np.array([math.nan, math.nan])
    boots = np.full((n_boot, 2), np.nan)
    if k >= 2:
        picks = np.random.default_rng(seed).integers(0, k, (n_boot, k))
        for b0 in range(0, n_boot, 256):
            p = picks[b0:b0 + 256]
            boots[b0:b0 + 256] = mean_over_seeds(RX[:, p], RY[:, p])

    return Correlation(metric=metric, spearman=float(point[0]), spearman_ci=_interval(boots[:, 0], level),
                       kendall=float(point[1]), kendall_ci=_interval(boots[:, 1], level), n=int(X.size), level=level)

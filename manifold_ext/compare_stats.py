"""The statistics of a compare run: the gains, the ranking, each metric's correlations with the
gains, the equal-size order, and the warnings that say when the run cannot support a conclusion."""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import List, Optional, Sequence

import torch

from .builtin import Candidate
from .stats import rank_correlation, within_seed_correlation

PRESERVING = 1e-4  # an expansion whose measured preservation error is below this preserves the function
CHANCE_MARGIN = 0.05  # a base less than this (5 points of accuracy) above chance is at chance level
UNIGRAM_MARGIN = 0.1  # a language model whose test loss is not this far (nats) below the unigram's
SIGNAL_P = 0.05  # a Friedman p-value above this: the gains do not differ beyond the seed spread
EQUAL_SIZE_TOLERANCE = 0.005  # parameter counts this close (relative) are of equal size




def metric_names(settings) -> List[str]:
    """Every metric compared: ``size_<estimator>`` then the baselines."""
    return [f"size_{e}" for e in settings.estimators] + list(settings.baselines)


def metric_value(unit: dict, name: str) -> float:
    """A unit's value of metric ``name`` (``size_<estimator>`` or a baseline)."""
    if name.startswith("size_"):
        return unit["sizes"][name[5:]]
    return unit["baselines"][name]


def equal_size(a: int, b: int) -> bool:
    """Whether two parameter counts are equal within :data:`EQUAL_SIZE_TOLERANCE` (relative): some
    architectures (GPT-2's blocks have biases) allow no width expansion of exactly a block's size."""
    return abs(a - b) <= EQUAL_SIZE_TOLERANCE * max(a, b)


def equal_size_order(units: List[dict], name: str) -> Optional[float]:
    """Share of pairs of candidates of equal size (:func:`equal_size`, same seed) that the metric
    puts in the order of their gains (ties in either count half)."""
    score, pairs = 0.0, 0
    for i, a in enumerate(units):
        for b in units[i + 1:]:
            if a["seed"] != b["seed"] or not equal_size(a["parameters"], b["parameters"]):
                continue
            dg = a["gain_over_base"] - b["gain_over_base"]
            dm = metric_value(a, name) - metric_value(b, name)
            if math.isnan(dm):
                continue
            pairs += 1
            score += 0.5 if dg == 0 or dm == 0 else float((dg > 0) == (dm > 0))
    return score / pairs if pairs else None


def add_gains(units: List[dict], bases: List[dict]) -> None:
    """Each unit's gains in test accuracy points over its seed's base and (when the run has one)
    over its seed's control, added to the unit."""
    base_acc = {b["seed"]: b["test_accuracy"] for b in bases}
    control = {u["seed"]: u["test_accuracy"] for u in units if u["candidate"] == "control"}
    for u in units:
        u["gain_over_base"] = 100 * (u["test_accuracy"] - base_acc[u["seed"]])
        u["gain_over_control"] = (100 * (u["test_accuracy"] - control[u["seed"]])
                                  if u["seed"] in control else None)


def ranking(candidates: Sequence[Candidate], units: List[dict], estimator: str) -> List[dict]:
    """The candidates by ``estimator``'s mean size over the seeds (-inf when any seed's region is
    empty), largest first, with their mean gains."""
    ranking = []
    for cand in candidates:
        mine = [u for u in units if u["candidate"] == cand.name]
        gains = torch.tensor([u["gain_over_base"] for u in mine], dtype=torch.float64)
        sizes = [u["sizes"][estimator] for u in mine]
        finite = [s for s in sizes if math.isfinite(s)]
        ranking.append({
            "candidate": cand.name, "parameters": mine[0]["parameters"],
            "gain_over_base": gains.mean().item(),
            "gain_std": gains.std().item() if len(mine) > 1 else None,
            "gain_over_control": (sum(u["gain_over_control"] for u in mine) / len(mine)
                                  if all(u["gain_over_control"] is not None for u in mine) else None),
            "size": sum(finite) / len(finite) if len(finite) == len(sizes) else -math.inf,
            "empty": len(sizes) - len(finite),
        })
    ranking.sort(key=lambda r: r["size"], reverse=True)
    for i, r in enumerate(ranking):
        r["rank"] = i + 1
    return ranking


def correlation_row(name: str, units: List[dict], n_boot: int) -> dict:
    """Metric ``name`` against the gains: within each seed (the headline), pooled, within each
    seed over the function-preserving candidates only, and the equal-size order."""
    gains = [u["gain_over_base"] for u in units]
    groups = [u["candidate"] for u in units]
    seeds_of = [u["seed"] for u in units]
    values = [metric_value(u, name) for u in units]
    row = asdict(within_seed_correlation(values, gains, seeds_of, groups, metric=name, n_boot=n_boot, seed=0))
    pooled = rank_correlation(values, gains, metric=name, groups=groups, n_boot=n_boot, seed=0)
    row["pooled_spearman"], row["pooled_spearman_ci"] = pooled.spearman, pooled.spearman_ci
    # The function-preserving expansions (and the control): a subset fixed before any metric is
    # seen, without the broken candidates whose collapse any metric can spot.
    kept = [i for i, u in enumerate(units)
            if u["preservation_error"] is not None and u["preservation_error"] <= PRESERVING]
    sub = within_seed_correlation([values[i] for i in kept], [gains[i] for i in kept],
                                  [seeds_of[i] for i in kept], [groups[i] for i in kept], n_boot=n_boot, seed=0)
    row["preserving_spearman"], row["preserving_spearman_ci"], row["preserving_n"] = sub.spearman, sub.spearman_ci, sub.n
    row["equal_size_order"] = equal_size_order(units, name)
    return row


def warnings_of(bases: List[dict], signal: dict, n_seeds: int, n_candidates: int, multiple: float) -> List[str]:
    """The warnings :func:`manifold_ext.compare.summarise` describes, in that order."""
    warnings = []
    chance = [b["chance_accuracy"] for b in bases if b.get("chance_accuracy") is not None]
    if chance:
        acc = sum(b["test_accuracy"] for b in bases) / len(bases)
        if acc < chance[0] + CHANCE_MARGIN:
            warnings.append(f"the base is at chance level (test accuracy {100 * acc:.1f}% vs chance "
                            f"{100 * chance[0]:.1f}%): the gains below measure noise, not expansion")
    unigram = [b for b in bases if b.get("unigram_loss") is not None]
    if unigram:
        lm_loss = sum(b["test_loss"] for b in unigram) / len(unigram)
        if lm_loss > unigram[0]["unigram_loss"] - UNIGRAM_MARGIN:
            warnings.append(f"the base has not learned beyond token frequencies (test loss {lm_loss:.3g} vs "
                            f"{unigram[0]['unigram_loss']:.3g} of the unigram model): the gains below measure "
                            f"noise, not expansion")
    over = [b for b in bases if b.get("chance_loss") is not None and b["threshold"] >= b["chance_loss"]]
    if over:
        b = max(over, key=lambda b: b["threshold"] - b["chance_loss"])
        which = f" (for {len(over)} of the {len(bases)} seeds' bases)" if len(over) < len(bases) else ""
        limits = [o["chance_loss"] / o["probe_loss"] for o in over if o["probe_loss"] > 0]
        advice = (f"set threshold_multiple below {min(limits):.3g}" if limits and min(limits) > 1
                  else "the base's own probe loss is not below it")
        warnings.append(f"the loss threshold is not below the chance-level loss{which}: {multiple:g} x "
                        f"the base's probe loss {b['probe_loss']:.3g} = {b['threshold']:.3g} >= ln({b['outputs']}) = "
                        f"{b['chance_loss']:.3g}, the loss of uniform predictions over its {b['outputs']} outputs; "
                        f"the manifold sizes take in models no better than chance: {advice}")
    p = signal["friedman_p"]
    if p is not None and p > SIGNAL_P:
        text = (f"the candidates' gains do not differ beyond the seed spread (Friedman p = {p:.2g}): "
                "no ranking conclusion can be drawn")
        if signal["friedman_min_p"] > SIGNAL_P:
            text += (f" (with {n_seeds} seeds and {n_candidates} candidates, p cannot fall "
                     f"below {signal['friedman_min_p']:.2g}: run more seeds)")
        warnings.append(text)
    return warnings

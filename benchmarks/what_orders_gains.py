"""What a metric sees of a finished compare run's gains, seed by seed: its Spearman correlation
with the gains, with a second metric (``--control``, default the loss after adaptation) and with
the parameter count, the control's own correlation with the gains, and the metric's correlation
with what of the gains' ranks the control does not explain (the residual of a straight-line fit
of the gains' ranks on the control's ranks).

    python -m benchmarks.what_orders_gains RESULTS.json [--metric size_minima] [--control loss]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from scipy.stats import rankdata, spearmanr


def values_of(units: list, metric: str) -> np.ndarray:
    """The metric's value in every unit (``size_NAME`` for an estimator, else a baseline)."""
    if metric.startswith("size_"):
        return np.array([u["sizes"][metric[5:]] for u in units], dtype=float)
    return np.array([u["baselines"][metric] for u in units], dtype=float)


def per_seed(res: dict, metric: str, control: str) -> list:
    base = {b["seed"]: b["test_accuracy"] for b in res["bases"]}
    rows = []
    for seed in sorted(base):
        units = [u for u in res["units"] if u["seed"] == seed]
        gain = np.array([u["test_accuracy"] - base[seed] for u in units])
        m, c = values_of(units, metric), values_of(units, control)
        params = np.array([u["parameters"] for u in units], dtype=float)
        rg, rc = rankdata(gain), rankdata(c)
        residual = rg - np.polyval(np.polyfit(rc, rg, 1), rc)
        rows.append({"seed": seed, "metric_gain": spearmanr(m, gain)[0], "metric_control": spearmanr(m, c)[0],
                     "metric_parameters": spearmanr(m, params)[0], "control_gain": spearmanr(c, gain)[0],
                     "metric_residual": spearmanr(m, residual)[0]})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results")
    p.add_argument("--metric", default="size_minima")
    p.add_argument("--control", default="loss")
    args = p.parse_args(argv)
    with open(args.results) as f:
        rows = per_seed(json.load(f), args.metric, args.control)
    m, c = args.metric, args.control
    print(f"{'seed':>4} {m + '~gain':>18} {m + '~' + c:>18} {m + '~parameters':>24} {c + '~gain':>12} "
          f"{m + '~gain | ' + c:>24}")
    for r in rows:
        print(f"{r['seed']:>4} {r['metric_gain']:>+18.2f} {r['metric_control']:>+18.2f} {r['metric_parameters']:>+24.2f} "
              f"{r['control_gain']:>+12.2f} {r['metric_residual']:>+24.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Sizes derived from a finished suite run's units, without measuring anything again: each
variant's within-seed Spearman with the gains and its equal-size order, per task, as ``compare``
computes them.

    python -m benchmarks.estimator_variants SUITE_DIR [--json FILE]

The variants:

* ``radius``, ``minima``: the estimators as the run measured them;
* ``radius + log d``: the radius size plus the log of the parameter count d (a radius per
  parameter's share of the space);
* ``minima + log d``: the same for the minima size;
* ``ball log-volume``: the log-volume of the d-dimensional ball of the measured radius,
  ``d * radius + (d / 2) log pi - lgamma(d / 2 + 1)`` (the manifold's volume if it were a ball);
* ``rank(radius) + rank(minima)``: the two estimators' ranks within the seed, added.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
from scipy import stats

from benchmarks.harness import save
from manifold_ext import compare as C
from manifold_ext.stats import within_seed_correlation


def _ball(d: int, size: float) -> float:
    return d * size + (d / 2) * math.log(math.pi) - math.lgamma(d / 2 + 1)


def _rank_sum(units: list, names) -> list:
    out = np.zeros(len(units))
    for s in {u["seed"] for u in units}:
        idx = [i for i, u in enumerate(units) if u["seed"] == s]
        for n in names:
            v = np.array([units[i]["sizes"][n] for i in idx], dtype=float)
            out[idx] += stats.rankdata(np.where(np.isfinite(v), v, -1e300))
    return out.tolist()


def variants(units: list) -> dict:
    """Every variant's value per unit."""
    return {
        "radius": [u["sizes"]["radius"] for u in units],
        "minima": [u["sizes"]["minima"] for u in units],
        "parameters": [float(u["parameters"]) for u in units],
        "radius + log d": [u["sizes"]["radius"] + math.log(u["parameters"]) for u in units],
        "minima + log d": [u["sizes"]["minima"] + math.log(u["parameters"]) for u in units],
        "ball log-volume": [_ball(u["parameters"], u["sizes"]["radius"]) for u in units],
        "rank(radius) + rank(minima)": _rank_sum(units, ("radius", "minima")),
    }


def task_table(run: Path) -> dict:
    result = json.loads((run / "results.json").read_text())
    units = result["units"]
    gains = [u["gain_over_base"] for u in units]
    seeds, cands = [u["seed"] for u in units], [u["candidate"] for u in units]
    rows = {}
    for name, values in variants(units).items():
        corr = within_seed_correlation(values, gains, seeds, cands, n_boot=10, seed=0)
        fake = [dict(u, sizes={"x": v}) for u, v in zip(units, values)]
        rows[name] = {"spearman": corr.spearman, "equal_size_order": C.equal_size_order(fake, "size_x")}
    p = result["signal"].get("friedman_p")
    return {"task": run.name, "has_signal": p is not None and p <= C.SIGNAL_P, "rows": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("suite_dir", type=Path)
    p.add_argument("--json", default="results/bench_estimator_variants.json")
    args = p.parse_args(argv)
    tasks = [task_table(d) for d in sorted(args.suite_dir.iterdir()) if (d / "results.json").exists()]
    save({"suite_dir": str(args.suite_dir), "tasks": tasks}, args.json)
    names = list(tasks[0]["rows"])
    print(f"{'variant':30s}" + "".join(f"{t['task'][:18]:>19}" for t in tasks) + f"{'average':>9}")
    for n in names:
        cells = [t["rows"][n] for t in tasks]
        avg = [c["spearman"] for c, t in zip(cells, tasks) if t["has_signal"]]
        print(f"{n:30s}" + "".join(f"{c['spearman']:+.2f} / {c['equal_size_order'] or float('nan'):.2f}".rjust(19)
                                   for c in cells) + f"{sum(avg) / len(avg):>+9.2f}")
    print("(within-seed Spearman / equal-size order; the average over the tasks with signal)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

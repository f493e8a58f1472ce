"""Every metric's correlation with the gains of a finished compare run, within each seed
(averaged over the seeds) and pooled, from its ``results.json``: for runs written before compare
reported within-seed correlations.

    python -m benchmarks.within_seed RESULTS.json [--n-boot 2000]
"""

from __future__ import annotations

import argparse
import json

from manifold_ext.stats import rank_correlation, within_seed_correlation


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results")
    p.add_argument("--n-boot", type=int, default=2000)
    args = p.parse_args(argv)
    with open(args.results) as f:
        res = json.load(f)
    units = res["units"]
    names = [c["metric"] for c in res["correlations"]]
    gains = [u["gain_over_base"] for u in units]
    seeds, cands = [u["seed"] for u in units], [u["candidate"] for u in units]
    print(f"{'metric':24s} {'within seeds':>12} {'95% interval':>16} {'pooled':>8}")
    for name in names:
        values = [u["sizes"][name[5:]] if name.startswith("size_") else u["baselines"][name] for u in units]
        w = within_seed_correlation(values, gains, seeds, cands, n_boot=args.n_boot)
        pooled = rank_correlation(values, gains, groups=cands, n_boot=10)
        print(f"{name:24s} {w.spearman:>12.2f} [{w.spearman_ci[0]:>6.2f}, {w.spearman_ci[1]:>5.2f}] {pooled.spearman:>8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

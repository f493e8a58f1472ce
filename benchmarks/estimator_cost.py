"""Cost of each manifold-size estimator and of the baselines at default settings, on the digits
MLP 64-256-256-10 (trained 20 epochs with Adam; the probe set is the 1078 training examples).
Prints a table and saves JSON.

    python -m benchmarks.estimator_cost [--threads 2] [--json results/estimator_cost.json]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from benchmarks.harness import save
from manifold_ext import baselines, manifold, models
from manifold_ext.data import load_digits


def trained_mlp(epochs: int = 20, seed: int = 0):
    """The digits MLP of the engine benchmarks, trained with Adam (lr 1e-3, batches of 64)."""
    d = load_digits()
    torch.manual_seed(seed)
    model = models.mlp((64, 256, 256, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(d.x_train), generator=g)
        for i in range(0, len(perm), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            F.cross_entropy(model(d.x_train[idx]), d.y_train[idx]).backward()
            opt.step()
    return model.eval(), (d.x_train, d.y_train)


def measure() -> dict:
    model, data = trained_mlp()
    rows = []
    for name, fn in manifold.ESTIMATORS.items():
        est = fn(model, data, quiet=True)
        rows.append({"estimator": name, "seconds": est.seconds, "evaluations": est.n_evaluations,
                     "size": est.size, "spread": est.spread, "dimension": est.dimension,
                     "threshold": est.threshold, "anchor_loss": est.anchor_loss})
    start = time.perf_counter()
    report = baselines.compute_baselines(model, data, quiet=True)
    return {"estimators": rows, "baselines_seconds": time.perf_counter() - start,
            "baseline_seconds": report.seconds, "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default="results/estimator_cost.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    res = measure()
    print(f"{'estimator':10s} {'seconds':>8s} {'evaluations':>12s} {'size':>8s} {'spread':>8s} {'k':>3s}")
    for r in res["estimators"]:
        spread = "-" if r["spread"] is None else f"{r['spread']:.3f}"
        print(f"{r['estimator']:10s} {r['seconds']:8.1f} {r['evaluations']:12d} {r['size']:8.3f} {spread:>8s} {r['dimension']:3d}")
    print(f"all 12 baselines: {res['baselines_seconds']:.1f} s")
    save(res, args.json)


if __name__ == "__main__":
    main()

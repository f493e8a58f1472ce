"""How the loss threshold's rule (and, with ``--options``, an estimator's settings) changes each
estimator's prediction, on a finished suite run.

For every task of the run, seed and candidate, the candidate is grown and adapted again (as the
run did: deterministic given the seed) and each estimator is measured at the threshold of each
rule; the within-seed Spearman with the run's gains and the equal-size order follow as
``compare`` computes them. The rules:

* ``xM``: M times the base's probe loss, capped halfway to the chance-level loss ln K
  (:func:`manifold_ext.compare.loss_threshold`; ``x2`` is the default);
* ``fF``: the fraction F of the way from the base's probe loss to ln K;
* ``+D``: D nats above the base's probe loss, capped halfway to ln K.

    python -m benchmarks.threshold_sensitivity SUITE_DIR [--rules x1.25 x1.5 x2 x3 f0.1 f0.25 +0.1 +0.5]
        [--tasks mlp-digits ...] [--estimators radius minima] [--options JSON] [--json FILE]

``--options '{"minima": {"lr": 0.001}}'`` measures the estimators with these options on top of the
run's own; ``{"minima": {"train_data": "train"}}`` trains minima's runs on the task's whole training
set instead of the probe set. Without it, the recomputed sizes under the run's own rule are checked against the
run's (the largest difference is printed): a mismatch means the units were not reproduced.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from tqdm import tqdm

from benchmarks.harness import save
from manifold_ext import builtin
from manifold_ext import compare as C
from manifold_ext import manifold as M
from manifold_ext.stats import within_seed_correlation


def tau_of(rule: str, base_loss: float, chance_loss: float) -> float:
    """The threshold of ``rule`` (see the module docstring)."""
    value = float(rule[1:])
    if rule[0] == "x":
        return C.loss_threshold(value, base_loss, chance_loss)
    if rule[0] == "f":
        return base_loss + value * (chance_loss - base_loss)
    if rule[0] == "+":
        return min(base_loss + value, base_loss + C.CHANCE_CAP * max(chance_loss - base_loss, 0.0))
    raise ValueError(f"rule must be xM, fF or +D, got {rule!r}")


def task_sensitivity(run: Path, bench: builtin.Benchmark, rules, estimators, n_boot: int,
                     options: dict | None = None) -> dict:
    result = json.loads((run / "results.json").read_text())
    settings = C.Settings.from_dict(result["settings"])
    names = [c["name"] for c in result["candidates"]]
    cands = [c for c in bench.candidates if c.name in names]
    t = bench.task
    probe = (t.x_train[:settings.probe_examples], t.y_train[:settings.probe_examples])
    units = {(u["seed"], u["candidate"]): u for u in result["units"]}
    gains = {k: 100 * (u["test_accuracy"] - result["bases"][u["seed"]]["test_accuracy"]) for k, u in units.items()}
    sizes = {(e, r): {} for e in estimators for r in rules}
    mismatch = 0.0
    jobs = [(b, c) for b in result["bases"] for c in cands]
    for b, cand in tqdm(jobs, desc=run.name, leave=False):
        seed = b["seed"]
        base = C.load_base(bench, run, seed)
        _, grown, _, _ = C.grow_and_adapt(base, cand, t, settings, seed)
        for r in rules:
            tau = tau_of(r, b["probe_loss"], b["chance_loss"])
            for e in estimators:
                opts = {**settings.estimator_options.get(e, {}), **(options or {}).get(e, {})}
                if opts.get("train_data") == "train":  # the estimator's runs on the whole training set
                    opts["train_data"] = (t.x_train, t.y_train)
                size = M.ESTIMATORS[e](grown, probe, tau=tau, seed=seed, quiet=True, loss=settings.loss, **opts).size
                sizes[(e, r)][(seed, cand.name)] = size
                stored = units[(seed, cand.name)]["sizes"].get(e)
                if abs(tau - b["threshold"]) < 1e-12 and stored is not None and not options:
                    same = size == stored or (math.isinf(size) and math.isinf(stored))
                    mismatch = max(mismatch, 0.0 if same else abs(size - stored))
    keys = [(b["seed"], c.name) for b in result["bases"] for c in cands]
    rows = []
    for (e, r), got in sizes.items():
        values = [got[k] for k in keys]
        corr = within_seed_correlation(values, [gains[k] for k in keys], [k[0] for k in keys], [k[1] for k in keys],
                                       metric=f"{e} {r}", n_boot=n_boot, seed=0)
        fake = [dict(units[k], gain_over_base=gains[k], sizes={e: got[k]}) for k in keys]
        rows.append({"estimator": e, "rule": r, "spearman": corr.spearman, "spearman_ci": corr.spearman_ci,
                     "equal_size_order": C.equal_size_order(fake, f"size_{e}"),
                     "empty": sum(math.isinf(v) for v in values)})
    p = result["signal"].get("friedman_p")
    return {"task": run.name, "rows": rows, "max_size_mismatch": mismatch,
            "has_signal": p is not None and p <= C.SIGNAL_P,
            "thresholds": {r: [tau_of(r, b["probe_loss"], b["chance_loss"]) for b in result["bases"]] for r in rules}}


def table(tasks: list, rules, estimators) -> str:
    names = [t["task"] for t in tasks]
    out = [f"{'estimator':9s} {'rule':>6}" + "".join(f"{n[:18]:>19}" for n in names) + f"{'average':>9}{'equal-size':>11}"]
    for e in estimators:
        for r in rules:
            cells, avg, order = [], [], []
            for t in tasks:
                row = next(x for x in t["rows"] if x["estimator"] == e and x["rule"] == r)
                cells.append(f"{row['spearman']:+.2f} ({row['empty']} empty)")
                if t["has_signal"]:
                    avg.append(row["spearman"])
                    if row["equal_size_order"] is not None:
                        order.append(row["equal_size_order"])
            out.append(f"{e:9s} {r:>6}" + "".join(f"{c:>19}" for c in cells)
                       + f"{sum(avg) / len(avg) if avg else float('nan'):>+9.2f}"
                       + f"{sum(order) / len(order) if order else float('nan'):>11.2f}")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("suite_dir", type=Path)
    p.add_argument("--rules", nargs="+", default=["x1.25", "x1.5", "x2", "x3", "f0.1", "f0.25", "+0.1", "+0.5"])
    p.add_argument("--tasks", nargs="+", default=None, help="default: every task of the run")
    p.add_argument("--estimators", nargs="+", default=["radius", "minima"])
    p.add_argument("--options", type=json.loads, default=None,
                   help='estimator options on top of the run\'s, as JSON: {"minima": {"lr": 0.001}}')
    p.add_argument("--n-boot", type=int, default=200)
    p.add_argument("--json", default="results/bench_threshold_sensitivity.json")
    args = p.parse_args(argv)
    for r in args.rules:
        tau_of(r, 1.0, 2.0)
    benches = {b.name: b for b in builtin.suite()}
    wanted = args.tasks or [d.name for d in sorted(args.suite_dir.iterdir()) if (d / "results.json").exists()]
    order = [n for n in benches if n in wanted]
    start, tasks = time.perf_counter(), []
    for name in order:
        tasks.append(task_sensitivity(args.suite_dir / name, benches[name], args.rules, args.estimators, args.n_boot,
                                      args.options))
        print(f"{name}: largest difference from the run's own sizes {tasks[-1]['max_size_mismatch']:.3g}", flush=True)
    save({"suite_dir": str(args.suite_dir), "options": args.options, "tasks": tasks,
          "seconds": time.perf_counter() - start}, args.json)
    print(table(tasks, args.rules, args.estimators))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""How well any predictor can do on a finished suite run: the noise ceiling of its gains.

A unit's gain comes from one fine-tuning run, whose data order is noise no metric measured before
fine-tuning can see. For every task, seed and candidate of the run, the candidate is grown and
adapted again (as the run did: deterministic given the seed) and fine-tuned a second time with
another data order. Within each seed, the two gains' Spearman correlation ``r`` (``compare``'s own
within-seed statistic) is the gains' reliability. If the gain is a reproducible part g* plus
independent noise, the best possible predictor, g* itself, correlates with the observed gains at
about ``sqrt(r)``: that is the ceiling on any metric's within-seed Spearman. Likewise, when the two
runs order a fraction ``a`` of the equal-size pairs the same way, g* orders about
``(1 + sqrt(2a - 1)) / 2`` of them as the observed gains do: the ceiling on the equal-size order.

    python -m benchmarks.noise_ceiling SUITE_DIR [--tasks mlp-digits ...] [--json FILE]

The first unit of every task is also fine-tuned with the run's own data order and must reproduce
the run's test accuracy exactly (printed as ``reproduced``).
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
from manifold_ext.stats import within_seed_correlation
from manifold_ext.training import train

OTHER_ORDER = 7000  # the second fine-tuning's data-order seed is this + the unit's seed


def finetuned_accuracy(base, cand, task, settings, seed: int, order_seed: int) -> float:
    """Test accuracy of ``cand`` grown from ``base``, adapted as the run did and fine-tuned for the
    rest of the budget in the data order of ``order_seed``."""
    _, grown, opt, _ = C.grow_and_adapt(base, cand, task, settings, seed)
    train(grown, task.x_train, task.y_train, epochs=settings.finetune_epochs - settings.adapt_epochs,
          lr=settings.lr, batch_size=settings.batch_size, seed=order_seed, optimizer=opt, loss=settings.loss)
    return C.accuracy(grown, task.x_test, task.y_test, settings.loss)


def task_ceiling(run: Path, bench: builtin.Benchmark, n_boot: int) -> dict:
    """The reliability of one task's gains and the ceilings it implies."""
    result = json.loads((run / "results.json").read_text())
    settings = C.Settings.from_dict(result["settings"])
    names = [c["name"] for c in result["candidates"]]
    cands = [c for c in bench.candidates if c.name in names]
    units = {(u["seed"], u["candidate"]): u for u in result["units"]}
    base_acc = {b["seed"]: b["test_accuracy"] for b in result["bases"]}
    start = time.perf_counter()
    again, reproduced = {}, None
    for b in tqdm(result["bases"], desc=run.name, leave=False):
        seed = b["seed"]
        base = C.load_base(bench, run, seed)
        for cand in cands:
            if reproduced is None:
                same = finetuned_accuracy(base, cand, bench.task, settings, seed, 2000 + seed)
                reproduced = same == units[(seed, cand.name)]["test_accuracy"]
            acc = finetuned_accuracy(base, cand, bench.task, settings, seed, OTHER_ORDER + seed)
            again[(seed, cand.name)] = 100 * (acc - base_acc[seed])
    keys = [(b["seed"], c.name) for b in result["bases"] for c in cands]
    gains = [100 * (units[k]["test_accuracy"] - base_acc[k[0]]) for k in keys]
    second = [again[k] for k in keys]
    corr = within_seed_correlation(second, gains, [k[0] for k in keys], [k[1] for k in keys],
                                   metric="second fine-tuning", n_boot=n_boot, seed=0)
    fake = [dict(units[k], gain_over_base=g, sizes={"again": a}) for k, g, a in zip(keys, gains, second)]
    agree = C.equal_size_order(fake, "size_again")
    p = result["signal"].get("friedman_p")
    return {"task": run.name, "reliability": corr.spearman, "reliability_ci": corr.spearman_ci,
            "spearman_ceiling": math.sqrt(corr.spearman) if corr.spearman > 0 else 0.0,
            "equal_size_agreement": agree,
            "equal_size_ceiling": None if agree is None else (1 + math.sqrt(max(2 * agree - 1, 0.0))) / 2,
            "has_signal": p is not None and p <= C.SIGNAL_P, "reproduced": reproduced,
            "units": len(keys), "seconds": time.perf_counter() - start}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("suite_dir", type=Path)
    p.add_argument("--tasks", nargs="+")
    p.add_argument("--n-boot", type=int, default=500)
    p.add_argument("--json", type=Path, default=Path("results/bench_noise_ceiling.json"))
    args = p.parse_args(argv)
    benches = {b.name: b for b in builtin.suite()}
    wanted = args.tasks or [d.name for d in sorted(args.suite_dir.iterdir()) if (d / "results.json").exists()]
    rows = [task_ceiling(args.suite_dir / n, benches[n], args.n_boot) for n in benches if n in wanted]
    print(f"{'task':22s} {'reliability':>11} {'ceiling':>8} {'eq-size agree':>14} {'eq ceiling':>11} {'reproduced':>11}")
    for r in rows:
        eq = "-" if r["equal_size_agreement"] is None else f"{r['equal_size_agreement']:.2f}"
        eqc = "-" if r["equal_size_ceiling"] is None else f"{r['equal_size_ceiling']:.2f}"
        print(f"{r['task']:22s} {r['reliability']:11.2f} {r['spearman_ceiling']:8.2f} {eq:>14} {eqc:>11} "
              f"{str(r['reproduced']):>11}")
    with_signal = [r for r in rows if r["has_signal"]]
    if with_signal:
        avg = sum(r["spearman_ceiling"] for r in with_signal) / len(with_signal)
        eqs = [r["equal_size_ceiling"] for r in with_signal if r["equal_size_ceiling"] is not None]
        print(f"average over the {len(with_signal)} tasks with signal: Spearman ceiling {avg:.2f}"
              + (f", equal-size ceiling {sum(eqs) / len(eqs):.2f}" if eqs else ""))
    save({"tasks": rows}, str(args.json))


if __name__ == "__main__":
    main()

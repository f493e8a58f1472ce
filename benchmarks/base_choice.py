"""How long a built-in benchmark's base trains: for each pre-training length, the base's test
loss and accuracy and the candidates' gains after the benchmark's budget (grow, adapt, fine-tune;
no metrics), with the spread of the candidates' mean gains against the seed spread and Friedman's p.

    python -m benchmarks.base_choice [--model gpt2] [--task python] [--rounds 3] [--epochs 2 4 8] [--json FILE]

``--rounds`` is the number of seeds. For a language model the unigram model's test loss is the
floor a base must beat (the column shows it; "-" for classification).
"""

from __future__ import annotations

import argparse
import time

from benchmarks.harness import save
from manifold_ext import builtin
from manifold_ext import compare as C
from manifold_ext.stats import gain_signal


def measure(bench: builtin.Benchmark, epochs: int, seeds: int) -> dict:
    s = C.settings_for(bench, base_epochs=epochs)
    t = bench.task
    start, gains, losses, accs = time.perf_counter(), [], [], []
    for seed in range(seeds):
        base = C._fresh_base(bench, seed)
        C.train(base, t.x_train, t.y_train, epochs=s.base_epochs, lr=s.lr, batch_size=s.batch_size, seed=seed,
                loss=s.loss)
        acc = C.accuracy(base, t.x_test, t.y_test, s.loss)
        losses.append(C.mean_loss(base, t.x_test, t.y_test, s.loss))
        accs.append(acc)
        row = []
        for cand in bench.candidates:
            _, grown, opt, _ = C.grow_and_adapt(base, cand, t, s, seed)
            C.train(grown, t.x_train, t.y_train, epochs=s.finetune_epochs - s.adapt_epochs, lr=s.lr,
                    batch_size=s.batch_size, seed=2000 + seed, optimizer=opt, loss=s.loss)
            row.append(100 * (C.accuracy(grown, t.x_test, t.y_test, s.loss) - acc))
        gains.append(row)
    return {"base_epochs": epochs, "seeds": seeds, "base_test_loss": losses, "base_accuracy": accs,
            "unigram_loss": C.unigram_loss(t) if s.loss == "lm" else None, "candidates": [c.name for c in bench.candidates], "gains": gains,
            "signal": gain_signal(gains), "seconds": time.perf_counter() - start}


def _f(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)  # None: needs 2 seeds (3 candidates for Friedman)


def table(rows: list) -> str:
    out = ["base epochs  base test loss   accuracy  unigram  candidate spread  seed spread  Friedman p"]
    for r in rows:
        g = r["signal"]
        out.append(f"{r['base_epochs']:>11}  {min(r['base_test_loss']):.3f}-{max(r['base_test_loss']):.3f}  "
                   f"{100 * sum(r['base_accuracy']) / len(r['base_accuracy']):>8.1f}%  {_f(r['unigram_loss'], '.3f'):>7}  "
                   f"{g['candidate_spread']:>16.2f}  {_f(g['seed_spread'], '.2f'):>11}  {_f(g['friedman_p'], '.2g'):>10}")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2")
    p.add_argument("--task", default=None, help="default: the model's")
    p.add_argument("--rounds", type=int, default=3, help="seeds")
    p.add_argument("--epochs", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--json", default=None, help="default: results/bench_base_choice_MODEL-TASK.json")
    args = p.parse_args(argv)
    bench = builtin.benchmark(args.model, args.task)
    rows = [measure(bench, e, args.rounds) for e in args.epochs]
    args.json = args.json or f"results/bench_base_choice_{bench.name}.json"
    save({"runs": rows}, args.json)
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

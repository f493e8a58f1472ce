"""How far apart minima's training runs end, at several batch sizes, on one unit of a finished run.

The unit (a candidate at a seed) is grown and adapted again as the run did (deterministic given
the seed); two copies are then trained as minima trains its runs (Adam, the run's minima options,
seeds 0 and 1) on the run's probe set with each batch size. Printed per batch size: how far the
first run moved from the adapted model, how far apart the two runs ended (raw parameter units)
and in how many coordinates they differ by more than 1e-4. With one batch of the whole probe set
the runs take the same steps whatever their data order and end apart only by rounding.

    python -m benchmarks.minima_runs RUN_DIR [--candidate control] [--seed 0] [--batch-sizes 64 8]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from benchmarks.harness import save
from manifold_ext import builtin
from manifold_ext import compare as C
from manifold_ext import manifold as M


def runs_apart(run: Path, candidate: str, seed: int, batch_sizes) -> list:
    bench = next(b for b in builtin.suite() if b.name == run.name)
    settings = C.Settings.from_dict(json.loads((run / "results.json").read_text())["settings"])
    cand = next(c for c in bench.candidates if c.name == candidate)
    _, grown, _, _ = C.grow_and_adapt(C.load_base(bench, run, seed), cand, bench.task, settings, seed)
    probe = (bench.task.x_train[:settings.probe_examples], bench.task.y_train[:settings.probe_examples])
    opts = settings.estimator_options.get("minima", {})
    anchor = {n: p.detach().clone() for n, p in grown.named_parameters()}
    rows = []
    for bs in batch_sizes:
        ends = [M._train_copy(grown, probe, epochs=opts.get("epochs", 1), lr=opts.get("lr", 1e-4), batch_size=bs,
                              seed=i, loss=settings.loss) for i in range(2)]
        diff = [(ends[0][n] - ends[1][n]).double() for n in anchor]
        rows.append({"batch_size": bs,
                     "moved": math.sqrt(sum((ends[0][n].double() - anchor[n].double()).pow(2).sum().item()
                                            for n in anchor)),
                     "apart": math.sqrt(sum(d.pow(2).sum().item() for d in diff)),
                     "coordinates_apart": sum(int((d.abs() > 1e-4).sum()) for d in diff),
                     "coordinates": sum(d.numel() for d in diff)})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="one task's directory of a suite run, e.g. SUITE/gpt2-python-source")
    p.add_argument("--candidate", default="control")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 8])
    p.add_argument("--json", default="results/bench_minima_runs.json")
    args = p.parse_args(argv)
    rows = runs_apart(args.run_dir, args.candidate, args.seed, args.batch_sizes)
    save({"run_dir": str(args.run_dir), "candidate": args.candidate, "seed": args.seed, "rows": rows}, args.json)
    for r in rows:
        print(f"batch {r['batch_size']}: run moved {r['moved']:.3g}, runs apart {r['apart']:.3g}, "
              f"coordinates apart by > 1e-4: {r['coordinates_apart']} of {r['coordinates']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``manifold-ext bench``: run the repository's benchmark scripts (``python -m benchmarks.X``)."""

from __future__ import annotations

import argparse
import subprocess
import sys
import textwrap
from pathlib import Path

from ._args import CommandError, int_at_least

# name -> (module, one-line description, whether it takes --rounds)
BENCHMARKS = {
    "ops": ("benchmarks.ratios",
            "fused ops vs torch.bmm and a Python loop: throughput and memory ratios (results/bench_ops.json)",
            True),
    "engine": ("benchmarks.engine_ratios",
               "whole-model line probes, naive loop to fused engine, MLP and CNN (results/bench_engine.json)",
               True),
    "estimators": ("benchmarks.estimator_cost",
                   "cost of each manifold-size estimator and the baselines (results/estimator_cost.json)",
                   False),
    "expansion": ("benchmarks.expansion_preservation",
                  "measured function preservation of every preserving expansion "
                  "(results/expansion_preservation.json)",
                  False),
    "distributed": ("benchmarks.distributed_scaling",
                    "2 torchrun processes against 1 on a probe plane (results/distributed_scaling.json)",
                    True),
}


def add_parser(sub, common) -> None:
    """Register ``bench`` on the subcommand parsers ``sub``."""
    listing = "\n".join(f"  {name:11s} python -m {m}" for name, (m, _, _) in BENCHMARKS.items())
    p = sub.add_parser(
        "bench", parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter,
        help="run the benchmark scripts of the repository (a source checkout)",
        description=textwrap.fill(
            "Run benchmark scripts of the repository by name, each as `python -m benchmarks.X` in a "
            "subprocess from the repository root (where they write results/*.json). The benchmarks "
            "are not part of the installed package: this needs the source checkout that manifold_ext "
            "was installed (pip install -e) or built from.", 90) + "\n\n"
        + listing,
    )
    p.add_argument("names", nargs="*", metavar="NAME",
                   help=f"benchmarks to run, in order: {', '.join(BENCHMARKS)} (default: all)")
    p.add_argument("--list", action="store_true", help="print the benchmark names with a description and exit")
    p.add_argument("--rounds", type=int_at_least(1), metavar="N",
                   help="timing rounds, passed on to the benchmarks that take them "
                   f"({', '.join(n for n, b in BENCHMARKS.items() if b[2])}; default: theirs)")
    p.set_defaults(run=run)


def repo_root() -> Path:
    """The directory that holds the ``manifold_ext`` package, where ``benchmarks/`` lives in a
    source checkout."""
    return Path(__file__).resolve().parent.parent.parent


def _check_names(names) -> list:
    for name in names:
        if name not in BENCHMARKS:
            raise CommandError(f"NAME must be one of {', '.join(BENCHMARKS)}, got {name!r} (see --list)")
    return list(names) or list(BENCHMARKS)


def run(args: argparse.Namespace) -> int:
    """0 when every benchmark ran and exited 0, 1 otherwise."""
    names = _check_names(args.names)
    root = repo_root()
    if args.list:
        for name in names:
            print(f"{name:11s} {BENCHMARKS[name][1]}")
        return 0
    if args.rounds is not None:
        without = [n for n in names if not BENCHMARKS[n][2]]
        if len(without) == len(names):
            raise CommandError(f"--rounds applies to {', '.join(n for n, b in BENCHMARKS.items() if b[2])} only, "
                               f"got benchmark{'s' if len(names) > 1 else ''} {', '.join(names)}")
        if without:
            print(f"manifold-ext bench: note: --rounds does not apply to {', '.join(without)}", file=sys.stderr)
    bench_dir = root / "benchmarks"
    if not (bench_dir / "__init__.py").is_file():
        raise CommandError(f"the benchmarks are not installed with the package: expected the repository's "
                           f"benchmarks/ directory at {bench_dir}, found none; run from a source checkout "
                           f"(pip install -e . in a clone of the repository)")
    for name in names:
        script = root / (BENCHMARKS[name][0].replace(".", "/") + ".py")
        if not script.is_file():
            raise CommandError(f"NAME {name}: expected the script {script}, found none (an incomplete checkout?)")
    failed = []
    for name in names:
        module, _, takes_rounds = BENCHMARKS[name]
        cmd = [sys.executable, "-m", module]
        if takes_rounds and args.rounds is not None:
            cmd += ["--rounds", str(args.rounds)]
        print(f"== {name}: python -m {' '.join(cmd[2:])}  (in {root})", flush=True)
        code = subprocess.run(cmd, cwd=root).returncode
        if code != 0:
            failed.append(f"{name} (exit status {code})")
    if failed:
        print(f"manifold-ext bench: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0

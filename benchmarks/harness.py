"""Side-by-side timing for noisy machines: methods are run interleaved, round after round, and
compared by the ratio of their medians, never by absolute times across runs."""

from __future__ import annotations

import json
import os
import statistics
import time
from typing import Callable, Dict

import torch


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_interleaved(methods: Dict[str, Callable[[], object]], *, rounds: int = 7, warmup: int = 2,
                     device: str = "cpu", stat: str = "min") -> Dict[str, float]:
    """Seconds per call of each method, measured in interleaved rounds: the best round ("min",
    the default: what the code can do when the shared machine leaves it alone, as timeit advises)
    or the "median"."""
    for _ in range(warmup):
        for fn in methods.values():
            fn()
    _sync(device)
    samples: Dict[str, list] = {name: [] for name in methods}
    for _ in range(rounds):
        for name, fn in methods.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            samples[name].append(time.perf_counter() - t0)
    pick = min if stat == "min" else statistics.median
    return {name: pick(s) for name, s in samples.items()}


def matmul_ceiling(device: str = "cpu", n: int = 2048, dtype=torch.float32) -> float:
    """FLOP/s of a large square torch.mm on this machine, now: the compute roofline."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = time_interleaved({"mm": lambda: torch.mm(a, b)}, rounds=9, warmup=3, device=device)["mm"]
    return 2.0 * n**3 / t


def save(res: dict, path: str) -> None:
    """Write benchmark results as JSON, with the build they measured."""
    import manifold_ext

    res.setdefault("build_info", manifold_ext.build_info())
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(res, f, indent=2)


def run_main(doc: str, measure: Callable[[int], dict], table: Callable[[dict], str], json_path: str,
             argv=None, rounds: int = 3, count: str = "rounds") -> int:
    """The command line every benchmark script shares: ``--rounds`` (or ``--<count>``: what the
    one number ``measure`` takes counts) and ``--json``; measures, saves the results as JSON and
    prints the table."""
    import argparse

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(f"--{count}", type=int, default=rounds)
    p.add_argument("--json", default=json_path)
    args = p.parse_args(argv)
    res = measure(getattr(args, count))
    save(res, args.json)
    print(table(res))
    return 0

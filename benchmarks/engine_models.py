"""The default engine against the loop on every model of the engine benchmark: line probes of B=64
points (32 for ResNet-18) on the digits MLP and CNN, torchvision ResNet-18, and small Hugging Face GPT-2 and LLaMA
language models (built from configs), each at N=64 examples and at N=all, timed side by side.

    python -m benchmarks.engine_models [--rounds 3] [--json results/bench_engine_models.json]

Targets: the default engine (``engine="auto"``) at least 0.95x the loop's speed everywhere, and
at least 2x where the fused path can win (the MLP at N=64).
"""

from __future__ import annotations

import argparse

import torch

from benchmarks import engine_cases
from benchmarks.harness import save, time_interleaved
from manifold_ext import engine
from manifold_ext.data import load_digits

POINTS = {"resnet18": 32}  # points per line (default 64): ResNet-18's loop takes seconds per line
TOKENS = 32
ALL = {"mlp": 1797, "cnn": 1797, "resnet18": 256, "gpt2": 256, "llama": 256}
FAST_CASES = {("mlp", 64)}  # where the engine benchmark shows the fused path winning


def _models(arch):
    from manifold_ext import real_models as R

    if arch == "mlp":
        return engine_cases.mlp(0), engine_cases.mlp(1)
    if arch == "cnn":
        return engine_cases.small_cnn(0), engine_cases.small_cnn(1)
    if arch == "resnet18":
        return R.resnet18(seed=0), R.resnet18(seed=1)
    kw = dict(vocab=512, positions=TOKENS, width=64, layers=2, heads=4)
    if arch == "gpt2":
        return R.gpt2(seed=0, **kw), R.gpt2(seed=1, **kw)
    return R.llama(seed=0, inner=176, kv_heads=2, **kw), R.llama(seed=1, inner=176, kv_heads=2, **kw)


def _data(arch, N):
    g = torch.Generator().manual_seed(0)
    if arch in ("mlp", "cnn"):
        d = load_digits(test_fraction=0.5)
        x = torch.cat([d.x_train, d.x_test])[:N]
        y = torch.cat([d.y_train, d.y_test])[:N]
        return ((x.reshape(-1, 1, 8, 8) if arch == "cnn" else x), y), "cross_entropy"
    if arch == "resnet18":
        return (torch.randn(N, 3, 32, 32, generator=g), torch.randint(0, 10, (N,), generator=g)), "cross_entropy"
    ids = torch.randint(0, 512, (N, TOKENS), generator=g)
    return (ids, ids), "lm"


def case(arch, N, only=None):
    """{"loop", "default", "fused"}: each evaluates the B points of a line between two models."""
    a, b = _models(arch)
    data, loss = _data(arch, N)
    t = torch.linspace(0, 1, POINTS.get(arch, 64))
    coeffs = torch.stack([1 - t, t], 1)
    run = lambda e: lambda: engine.evaluate(a, [a, b], coeffs, data, loss=loss, engine=e, quiet=True)  # noqa: E731
    methods = {"loop": run("loop"), "default": run("auto"), "fused": run("fused")}
    return {only: methods[only]} if only else methods


def measure(rounds: int = 3, archs=tuple(ALL)) -> dict:
    res = {"points": {a: POINTS.get(a, 64) for a in archs}, "cases": {}}
    for arch in archs:
        for N in (64, ALL[arch]):
            methods = case(arch, N)
            a, verts, coeffs, data, kw = _line_args(arch, N)
            chosen = engine.evaluate(a, verts, coeffs, data, **kw).engine
            t = time_interleaved(methods, rounds=rounds, warmup=1)
            res["cases"][f"{arch}_N{N}"] = {
                "seconds": t, "default_vs_loop": t["loop"] / t["default"],
                "fused_vs_loop": t["loop"] / t["fused"], "default_chose": chosen,
                "target": 2.0 if (arch, N) in FAST_CASES else 0.95,
            }
            print(_row(f"{arch}_N{N}", res["cases"][f"{arch}_N{N}"]), flush=True)
    return res


def _line_args(arch, N):
    a, b = _models(arch)
    data, loss = _data(arch, N)
    t = torch.linspace(0, 1, POINTS.get(arch, 64))
    return a, [a, b], torch.stack([1 - t, t], 1), data, {"loss": loss, "quiet": True}


def _row(name, c) -> str:
    s = c["seconds"]
    return (f"{name:14s} loop {s['loop'] * 1e3:8.1f} ms  fused {s['fused'] * 1e3:8.1f} ms  default "
            f"{s['default'] * 1e3:8.1f} ms ({c['default_chose']:5s})  default/loop speed "
            f"{c['default_vs_loop']:5.2f}x (target >= {c['target']})  fused/loop {c['fused_vs_loop']:5.2f}x")


def table(res: dict) -> str:
    lines = [f"points on a line {res['points']}, float32, CPU; speed = loop time / method time"]
    lines += [_row(name, c) for name, c in res["cases"].items()]
    missed = [n for n, c in res["cases"].items() if c["default_vs_loop"] < c["target"]]
    lines.append("all targets met" if not missed else f"targets missed: {', '.join(missed)}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--arch", nargs="*", default=list(ALL), choices=list(ALL))
    p.add_argument("--json", default="results/bench_engine_models.json")
    args = p.parse_args(argv)
    res = measure(args.rounds, tuple(args.arch))
    save(res, args.json)
    print(table(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

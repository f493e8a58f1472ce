"""The probe-engine targets: whole-model line probes (B=64 points) on the digits data, the baseline
ladder of DESIGN.md section 7 timed side by side in one run.

    python -m benchmarks.engine_ratios [--json results/bench_engine.json]
"""

from __future__ import annotations

import torch

from benchmarks import engine_cases
from benchmarks.harness import matmul_ceiling, run_main, time_interleaved
from benchmarks.memory import peak_extra_bytes

TARGETS = [
    ("mlp", 64, "fused_vs_naive", 4.0),
    ("mlp", 64, "fused_vs_vmap", 4.0),
    ("cnn", 64, "fused_vs_naive", 4.0),
    ("cnn", 64, "fused_vs_vmap", 4.0),
    ("mlp", 1797, "fused_vs_naive", 1.5),
    ("cnn", 1797, "fused_vs_naive", 1.5),
    ("mlp", 1797, "fused_roofline_fraction", 0.6),
]


def measure(rounds: int = 5) -> dict:
    ceiling = matmul_ceiling()
    res = {"mm_ceiling_gflops": ceiling / 1e9, "cases": {}}
    for arch in ("mlp", "cnn"):
        for N in (64, 1797):
            methods, flops = engine_cases.line_case(arch, N)
            ref = methods["naive"]()
            for name, fn in methods.items():  # every rung computes the same losses
                torch.testing.assert_close(fn().float(), ref.float(), rtol=1e-4, atol=1e-5)
            t = time_interleaved({**methods, "floor": engine_cases.floor_case(arch, N)}, rounds=rounds)
            case = {"seconds": t, "fused_vs_naive": t["naive"] / t["fused"],
                    "fused_vs_inplace": t["inplace"] / t["fused"], "fused_vs_vmap": t["vmap"] / t["fused"],
                    # The most any method could gain: the floor's time is work none can skip.
                    "bound_vs_naive": t["naive"] / t["floor"], "bound_vs_vmap": t["vmap"] / t["floor"],
                    # How much of what is reachable the engine reaches: floor time over its time.
                    "fraction_of_bound": t["floor"] / t["fused"]}
            if flops is not None:
                case["fused_roofline_fraction"] = flops / t["fused"] / ceiling
            res["cases"][f"{arch}_N{N}"] = case
    mem = {m: peak_extra_bytes("line_case", m, arch="mlp", N=64) for m in ("vmap", "fused")}
    res["mlp_N64_peak_extra_bytes"] = mem
    return res


def check(res: dict) -> list:
    rows = []
    for arch, N, key, bound in TARGETS:
        v = res["cases"][f"{arch}_N{N}"][key]
        rows.append((f"{arch} N={N} {key}", v, f">= {bound}", v >= bound))
    return rows


def table(res: dict) -> str:
    lines = [f"mm ceiling {res['mm_ceiling_gflops']:.1f} GFLOP/s; B=64 points on a line, float32, CPU"]
    for name, case in res["cases"].items():
        secs = ", ".join(f"{k}={v * 1e3:.1f} ms" for k, v in case["seconds"].items())
        lines.append(f"{name}: {secs}")
    mem = res["mlp_N64_peak_extra_bytes"]
    lines.append(f"mlp N=64 peak extra memory: vmap {mem['vmap'] / 2**20:.1f} MiB, "
                 f"fused {mem['fused'] / 2**20:.1f} MiB")
    lines.append("floor: the products after the first layer alone, per-point weights prebuilt, one "
                 "batched BLAS call; bound = baseline / floor, the largest speed-up any method could reach")
    for name, case in res["cases"].items():
        lines.append(f"{name}: bound vs naive {case['bound_vs_naive']:.2f}x, bound vs vmap "
                     f"{case['bound_vs_vmap']:.2f}x; fused reaches {case['fused_vs_naive']:.2f}x and "
                     f"{case['fused_vs_vmap']:.2f}x, {case['fraction_of_bound']:.0%} of the bound")
    for name, v, want, met in check(res):
        lines.append(f"{name:40s} {v:8.3f}  {want:>7s}  {'yes' if met else 'NO'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    return run_main(__doc__, measure, table, "results/bench_engine.json", argv, rounds=5)


if __name__ == "__main__":
    raise SystemExit(main())

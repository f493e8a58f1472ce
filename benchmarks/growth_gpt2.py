"""Growing a GPT-2 of 124M parameters (the GPT-2 small config, random weights, nothing
downloaded): to 2x depth by stacking (a copy after every block, as G_stack does) and to 1.5x
feed-forward width (net2net), timed and with the peak extra memory of each.

    python -m benchmarks.growth_gpt2 [--rounds 3] [--json results/bench_growth_gpt2.json]
"""

from __future__ import annotations

import torch

from benchmarks.harness import run_main, time_interleaved
from benchmarks.memory import peak_extra_bytes
from manifold_ext.expand import Deepen, Widen, expand


def _base():
    import transformers

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()


SPECS = {
    "depth x2 (stack copies)": (Deepen(after="transformer.h.*", init="copy"),),
    "ff width x1.5 (net2net)": (Widen("transformer.h.*.mlp", factor=1.5, init="net2net"),),
}


def growth_case(only=None):
    """({name: grow}, None): each grows the 124M base once (no preservation check inputs beyond
    the family's default)."""
    base = _base()
    methods = {name: (lambda specs=specs: expand(base, *specs, generator=torch.Generator().manual_seed(0)))
               for name, specs in SPECS.items()}
    return ({only: methods[only]} if only else methods), None


def measure(rounds: int = 3) -> dict:
    methods, _ = growth_case()
    base_params = sum(p.numel() for p in _base().parameters())
    res = {"base_parameters": base_params, "cases": {}}
    t = time_interleaved(methods, rounds=rounds, warmup=1)
    for name, fn in methods.items():
        grown, report = fn()
        res["cases"][name] = {
            "seconds": t[name], "parameters": sum(p.numel() for p in grown.parameters()),
            "preservation_error": report.preservation_error,
            "peak_extra_bytes": peak_extra_bytes("growth_case", name, module="benchmarks.growth_gpt2"),
        }
    return res


def table(res: dict) -> str:
    lines = [f"GPT-2 small config, {res['base_parameters'] / 1e6:.1f}M parameters, random weights, float32, CPU"]
    for name, c in res["cases"].items():
        err = c["preservation_error"]
        lines.append(f"{name:26s} {c['seconds']:6.2f} s  peak extra {c['peak_extra_bytes'] / 2**20:7.0f} MiB  "
                     f"-> {c['parameters'] / 1e6:.1f}M parameters, preservation error "
                     f"{'n/a' if err is None else f'{err:.2g}'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    return run_main(__doc__, measure, table, "results/bench_growth_gpt2.json", argv)


if __name__ == "__main__":
    raise SystemExit(main())

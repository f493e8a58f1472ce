"""pytest-benchmark timings of whole-model line probes (B=64 points) for the baseline ladder,
and the engine targets measured side by side. Opt in:

    python -m pytest benchmarks --benchmark-enable
"""

import pytest

from benchmarks import engine_cases, engine_ratios


@pytest.mark.parametrize("arch,N", [("mlp", 64), ("mlp", 1797), ("cnn", 64), ("cnn", 1797)])
@pytest.mark.parametrize("method", ["naive", "inplace", "vmap", "fused"])
def test_line_probe(benchmark, arch, N, method):
    benchmark.group = f"line probe B=64 {arch} N={N}"
    methods, _ = engine_cases.line_case(arch, N)
    benchmark(methods[method])


def test_engine_targets():
    res = engine_ratios.measure()
    print("\n" + engine_ratios.table(res))
    missed = [(name, v, want) for name, v, want, met in engine_ratios.check(res) if not met]
    assert not missed, f"targets not met: {missed}"

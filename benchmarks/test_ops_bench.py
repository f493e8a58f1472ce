"""pytest-benchmark timings of the fused ops and their baselines, and the issue's targets as
ratios measured side by side in one run. Opt in:

    python -m pytest benchmarks --benchmark-enable
"""

import pytest
import torch

from benchmarks import cases, ratios

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _run(benchmark, fn, device):
    if device == "cuda":
        def fn_sync():
            fn()
            torch.cuda.synchronize()
        benchmark(fn_sync)
    else:
        benchmark(fn)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["fused", "bmm", "loop", "fused_shared", "bmm_shared"])
def test_interp_linear(benchmark, device, method):
    benchmark.group = f"interp_linear B=64 K=2 N=256 512x512 {device}"
    methods, _ = cases.interp_linear_case(device=device)
    _run(benchmark, methods[method], device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["fused", "materialised"])
def test_interp_linear_cross_entropy(benchmark, device, method):
    benchmark.group = f"interp_linear_cross_entropy B=16 N=512 in=256 C=32000 {device}"
    methods, _ = cases.cross_entropy_case(device=device)
    _run(benchmark, methods[method], device)


@pytest.mark.parametrize("device", DEVICES)
def test_targets(device):
    res = ratios.measure(device)
    print("\n" + ratios.table(res))
    missed = [(name, v, want) for name, v, want, met in ratios.check(res) if not met]
    assert not missed, f"targets not met: {missed}"

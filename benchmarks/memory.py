"""Peak extra host memory of one call, measured in a fresh process (CPU tensors have no
allocator statistics): the kernel's high-water mark (VmHWM) is reset after the inputs exist."""

from __future__ import annotations

import json
import subprocess
import sys

_CHILD = r"""
import importlib, json, sys, torch
from benchmarks import cases, engine_cases
case, method, kwargs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
if len(sys.argv) > 4:
    module = importlib.import_module(sys.argv[4])
else:
    module = engine_cases if hasattr(engine_cases, case) else cases
methods, _ = getattr(module, case)(**kwargs, only=method)
fn = methods[method]
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = rss()
fn()
print(json.dumps({"peak_extra_bytes": hwm() - before}))
"""


def peak_extra_bytes(case: str, method: str, *, module: str = "", **kwargs) -> int:
    """Bytes above the resident inputs that one call of <case>()[method] (from ``module``, or
    else benchmarks.cases or benchmarks.engine_cases) peaks at."""
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, case, method, json.dumps(kwargs)] + ([module] if module else []),
        check=True, capture_output=True, text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_extra_bytes"]

import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def dtypes_for(device):
    if device == "cuda":
        return [torch.float32, torch.float64, torch.bfloat16, torch.float16]
    return [torch.float32, torch.float64]


DEVICE_DTYPES = [(d, t) for d in DEVICES for t in dtypes_for(d)]


def tol(dtype):
    """(rtol, atol) for comparing a kernel with the float64-accumulated reference."""
    return {
        torch.float64: (1e-10, 1e-10),
        torch.float32: (1e-5, 1e-4),
        torch.bfloat16: (2e-2, 5e-2),
        torch.float16: (5e-3, 1e-2),
    }[dtype]


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: opt in with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def pytest_report_header(config):
    import manifold_ext

    return f"manifold_ext build: {manifold_ext.build_info()}"

import importlib.machinery
import os
import re
import shutil

import pytest
import torch

import manifold_ext as mx
from manifold_ext import _build


def test_build_info_reports_the_build():
    info = mx.build_info()
    assert "cpu" in info["kernels"]
    assert info["built_torch"] == torch.__version__.split("+")[0]
    assert info["torch"] == torch.__version__
    if "cuda" in info["kernels"]:
        assert "9.0" in info["cuda_archs"]
        assert info["built_cuda"] is not None


def test_cuda_kernels_built_when_toolchain_present():
    # CI must not silently drop the CUDA kernels: with nvcc and a CUDA build of torch present,
    # the build must contain them.
    nvcc_present = shutil.which("nvcc") is not None or bool(os.environ.get("CUDA_HOME"))
    if nvcc_present and torch.version.cuda is not None:
        assert "cuda" in mx.build_info()["kernels"], (
            "nvcc and a CUDA build of torch are present but the CUDA kernels were not compiled "
            "(was the build made with MANIFOLD_EXT_CUDA=0?)"
        )
    else:
        assert mx.build_info()["kernels"] == ["cpu"]


def test_version_mismatch_message():
    _build.check_versions("2.14.1", "2.14.1+cu130")  # local suffixes do not matter
    with pytest.raises(ImportError, match=r"built against torch 2\.13\.0, but torch 2\.14\.1 is installed; rebuild it: pip install --no-build-isolation -e \."):
        _build.check_versions("2.13.0", "2.14.1")


def test_missing_library_message(monkeypatch):
    monkeypatch.setattr(importlib.machinery.PathFinder, "find_spec", lambda *a, **k: None)
    with pytest.raises(ImportError, match=r"the compiled kernels \(manifold_ext/_C\*\.so\) are missing; rebuild"):
        _build.load()


def test_several_builds_message(monkeypatch, tmp_path):
    # A build left over from another naming (Python prefers _C.cpython-*.so to _C.abi3.so) must
    # not be loaded silently in place of the new one.
    names = sorted(["_C.abi3.so", "_C" + importlib.machinery.EXTENSION_SUFFIXES[0]])
    for name in names:
        (tmp_path / name).write_bytes(b"")
    monkeypatch.setattr(_build, "__file__", str(tmp_path / "_build.py"))
    with pytest.raises(ImportError, match=rf"several builds of the compiled kernels \({re.escape(', '.join(names))}\).*rebuild"):
        _build.load()


def test_unloadable_library_message(monkeypatch, tmp_path):
    bogus = tmp_path / "_C.so"
    bogus.write_bytes(b"not a shared library")
    spec = importlib.machinery.ModuleSpec("_C", None, origin=str(bogus))
    monkeypatch.setattr(importlib.machinery.PathFinder, "find_spec", lambda *a, **k: spec)
    with pytest.raises(ImportError, match=r"cannot load .*_C\.so .*built against another torch"):
        _build.load()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_kernels_registered_on_device():
    x = torch.randn(2, 3, 4, device="cuda")
    w = torch.randn(1, 5, 4, device="cuda")
    y = mx.interp_linear(x, w, None, torch.ones(2, 1, device="cuda"))
    assert y.device.type == "cuda"

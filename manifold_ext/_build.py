"""Loading the compiled kernels and reporting what they were built with."""

from __future__ import annotations

import importlib.machinery
import json
import os

import torch

_REBUILD = "rebuild it: pip install --no-build-isolation -e . (from the source tree)"


def _torch_base(version: str) -> str:
    return version.split("+")[0]


def check_versions(built_torch: str, runtime_torch: str) -> None:
    """Raise ImportError when the kernels were built against another torch than the running one."""
    if _torch_base(built_torch) != _torch_base(runtime_torch):
        raise ImportError(
            f"manifold_ext: the compiled kernels were built against torch {built_torch}, "
            f"but torch {runtime_torch} is installed; {_REBUILD}"
        )


def _builds(folder: str) -> list[str]:
    """The files in folder that Python would take for the extension module _C."""
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    return sorted(n for n in os.listdir(folder) if n.startswith("_C.") and n.endswith(suffixes))


def load() -> dict:
    """Load manifold_ext/_C*.so into torch.ops and return its build info."""
    folder = os.path.dirname(__file__)
    spec = importlib.machinery.PathFinder.find_spec("_C", [folder])
    if spec is None or spec.origin is None:
        raise ImportError(f"manifold_ext: the compiled kernels (manifold_ext/_C*.so) are missing; {_REBUILD}")
    # Python prefers _C.cpython-*.so to _C.abi3.so whatever their age, so a leftover of an older
    # build would be loaded in place of the new one.
    builds = _builds(folder)
    if len(builds) > 1:
        raise ImportError(
            f"manifold_ext: several builds of the compiled kernels ({', '.join(builds)}) in "
            f"{folder}, and {os.path.basename(spec.origin)} would be loaded, which may be stale; "
            f"delete them and {_REBUILD}"
        )
    try:
        torch.ops.load_library(spec.origin)
    except OSError as err:
        raise ImportError(
            f"manifold_ext: cannot load {spec.origin} ({err}); it was probably built against "
            f"another torch than the installed {torch.__version__}; {_REBUILD}"
        ) from err
    info = json.loads(torch.ops.manifold_ext._build_info())
    check_versions(info["torch"], torch.__version__)
    return info


_INFO = load()


def build_info() -> dict:
    """What the compiled kernels are: which devices, which CUDA architectures, which versions.

    Returns a dict with ``kernels`` (``["cpu"]`` or ``["cpu", "cuda"]``), ``cuda_archs`` (the
    ``TORCH_CUDA_ARCH_LIST`` the CUDA kernels were compiled for, or None), ``built_torch`` and
    ``built_cuda`` (the versions the build used) and ``torch`` (the running torch).
    """
    return {
        "kernels": ["cpu", "cuda"] if _INFO["cuda"] else ["cpu"],
        "cuda_archs": _INFO["cuda_archs"],
        "built_torch": _INFO["torch"],
        "built_cuda": _INFO["cuda_version"],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
    }

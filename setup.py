"""Build of the manifold_ext kernels.

Environment switches:
  MANIFOLD_EXT_CUDA=auto|0|1   CUDA kernels: auto builds them when nvcc and a CUDA build of torch
                               are both present; 1 insists (fails otherwise); 0 skips them (fast
                               iteration on CPU code).
  TORCH_CUDA_ARCH_LIST         architectures to compile for (default "9.0", the H100/H200).
  CUDA_HOME                    toolkit root; found from nvcc when unset.
  MANIFOLD_EXT_DEBUG=1         -O0 -g builds.
  MAX_JOBS                     parallel compile jobs (ninja).
"""

import glob
import importlib.machinery
import os
import re
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))

# The kernels use only libtorch (ops registered through the dispatcher, loaded with
# torch.ops.load_library) and no Python C API, so one build serves every CPython version that the
# installed torch supports: the stable ABI (_C.abi3.so, wheels tagged abi3). torch's extension
# builder then defines Py_LIMITED_API, so that a use of the full Python API would not compile, and
# does not link libtorch_python. The wheel tag names the oldest Python the package supports.
PY_LIMITED_API = "cp311"


def _has_cudart(root):
    return any(
        glob.glob(os.path.join(root, sub, "libcudart.so*"))
        for sub in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib"))
    )


def find_cuda_home():
    """The CUDA toolkit root: CUDA_HOME if set, else the directory above the real nvcc.

    torch guesses the root from where nvcc sits; when nvcc on PATH is a wrapper script that execs
    the real compiler (as on these machines), that guess has no libcudart and the link fails.
    """
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    candidates = []
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(real)))
        try:
            with open(real, "rb") as f:
                head = f.read(4096)
            if head.startswith(b"#!"):
                for path in re.findall(rb"(/[^\s\"']+)/bin/nvcc", head):
                    candidates.append(path.decode())
        except OSError:
            pass
    candidates += sorted(glob.glob("/usr/local/cuda*"), reverse=True) + ["/opt/cuda"]
    for root in candidates:
        if os.path.exists(os.path.join(root, "bin", "nvcc")) and _has_cudart(root):
            return root
    return None


def cuda_library_includes(cuda_home):
    """Header dirs of the CUDA libraries torch includes (cuSPARSE, cuBLAS, ...) when the toolkit
    lacks them: CUDA builds of torch from PyPI ship them in the nvidia/* wheels."""
    if os.path.exists(os.path.join(cuda_home, "include", "cusparse.h")):
        return []
    try:
        import nvidia
    except ImportError:
        return []
    found = set()
    for root in nvidia.__path__:
        for header in glob.glob(os.path.join(root, "*", "include", "cusparse.h")):
            found.add(os.path.dirname(header))
    return sorted(found)


def want_cuda(cuda_home):
    import torch

    mode = os.environ.get("MANIFOLD_EXT_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"MANIFOLD_EXT_CUDA must be auto, 0 or 1, got {mode!r}")
    have = cuda_home is not None and torch.version.cuda is not None
    if mode == "1" and not have:
        sys.exit(
            "MANIFOLD_EXT_CUDA=1 but the CUDA kernels cannot be built: "
            f"CUDA toolkit root={cuda_home!r}, torch.version.cuda={torch.version.cuda!r} "
            "(install a CUDA build of torch and put nvcc on PATH or set CUDA_HOME)"
        )
    return have and mode != "0"


def extensions():
    cuda_home = find_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    with_cuda = want_cuda(cuda_home)
    debug = os.environ.get("MANIFOLD_EXT_DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx = opt + ["-std=c++20"]
    include = [os.path.join(ROOT, "csrc")]
    if not with_cuda:
        ext = CppExtension(
            "manifold_ext._C",
            sources,
            include_dirs=include,
            extra_compile_args={"cxx": cxx},
            py_limited_api=True,
        )
        return [ext], False
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    archs = os.environ["TORCH_CUDA_ARCH_LIST"]
    sources += sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    include += cuda_library_includes(cuda_home)
    defines = ["-DMANIFOLD_EXT_WITH_CUDA", f'-DMANIFOLD_EXT_CUDA_ARCHS="{archs}"']
    nvcc = opt + ["-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"] + defines
    ext = CUDAExtension(
        "manifold_ext._C",
        sources,
        include_dirs=include,
        extra_compile_args={"cxx": cxx + defines, "nvcc": nvcc},
        py_limited_api=True,
    )
    return [ext], True


def build_ext_command():
    from torch.utils.cpp_extension import BuildExtension

    class BuildInPlace(BuildExtension):
        """An in-place build (pip install -e .) also deletes the package's other builds of each
        extension: Python finds manifold_ext/_C.cpython-311-*.so before _C.abi3.so, so a build
        left over from another naming would be the one loaded."""

        def copy_extensions_to_source(self):
            super().copy_extensions_to_source()
            suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
            for ext in self.extensions:
                built = os.path.join(ROOT, self.get_ext_filename(ext.name))
                stem = os.path.join(os.path.dirname(built), ext.name.rsplit(".", 1)[-1] + ".")
                for path in glob.glob(glob.escape(stem) + "*"):
                    if path != built and path.endswith(suffixes):
                        print(f"manifold_ext: removing the stale build {path}", flush=True)
                        os.remove(path)

    return BuildInPlace


def main():
    exts, with_cuda = extensions()  # first: it fixes CUDA_HOME before cpp_extension is imported

    print(f"manifold_ext: building {'CPU and CUDA' if with_cuda else 'CPU'} kernels", flush=True)
    setup(
        ext_modules=exts,
        cmdclass={"build_ext": build_ext_command()},
        options={"bdist_wheel": {"py_limited_api": PY_LIMITED_API}},
    )


main()

#!/usr/bin/env bash
# Configures (build/cmake), builds and runs the C++ tests of the CPU kernels; exits non-zero on any
# failure. Extra arguments go to the configure step, e.g. -DMANIFOLD_EXT_WITH_CUDA=ON.
# Environment: PYTHON (the interpreter whose torch to build against), JOBS (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-$(command -v python || command -v python3)}
torch_prefix=$("$python" -c 'import torch; print(torch.utils.cmake_prefix_path)')

cmake -S . -B build/cmake -DCMAKE_PREFIX_PATH="$torch_prefix" "$@"
cmake --build build/cmake -j "${JOBS:-2}"
ctest --test-dir build/cmake --output-on-failure

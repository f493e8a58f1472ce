#!/usr/bin/env bash
# The GPU check, for the lent H200 (the device tool), from the repo root, in one call:
#   bash benchmarks/gpu_check.sh
# Builds the kernels for sm_90, runs every CUDA test and the CUDA benchmarks, and prints a short
# table last. Logs go to $OUT (the device tool's folder that comes back) or /tmp. About 5 minutes:
# the build ~2-3, tests ~1, benchmarks ~1.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp}
py=${PYTHON:-python3}
export MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MANIFOLD_EXT_CUDA=1
export PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
$py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"

t0=$(date +%s)
if ! $py setup.py build_ext --inplace > "$out/gpu_build.log" 2>&1; then
  tail -40 "$out/gpu_build.log"; echo "BUILD FAILED"; exit 1
fi
echo "build: $(( $(date +%s) - t0 )) s"

t0=$(date +%s)
timeout 300 $py -m pytest tests -q -k cuda -p no:cacheprovider > "$out/gpu_tests.log" 2>&1
tests_rc=$?
tail -25 "$out/gpu_tests.log"
echo "cuda tests: rc=$tests_rc, $(( $(date +%s) - t0 )) s"

t0=$(date +%s)
timeout 240 $py -m benchmarks.ratios --device cuda --json "$out/bench_gpu.json" > "$out/gpu_bench.log" 2>&1
bench_rc=$?
echo "benchmarks: rc=$bench_rc, $(( $(date +%s) - t0 )) s"
echo "================ GPU check summary ================"
grep -E "passed|failed|error" "$out/gpu_tests.log" | tail -1
cat "$out/gpu_bench.log" | tail -20
exit $(( tests_rc != 0 || bench_rc != 0 ))

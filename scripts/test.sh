#!/usr/bin/env bash
# The whole test suite, from a fresh clone: lint, build (CPU kernels; set
# PATCHSLIM_CUDA=1 on a GPU machine), pytest, the C++ tests under ctest, and an
# nvcc compile of every CUDA source (sm_80, sm_90) where nvcc is present
# (PATCHSLIM_REQUIRE_NVCC=1 makes a missing nvcc an error).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
export PATCHSLIM_CUDA="${PATCHSLIM_CUDA:-0}"
PATCHSLIM_EXTRAS=test patchslim_setup_env
start=$SECONDS

echo "==> ruff"
ruff check .
ruff format --check .

echo "==> pytest"
# Exit code 5 (no tests collected) fails like any other non-zero code.
python -m pytest python_tests -q -p no:cacheprovider

echo "==> C++ tests and CUDA compile check (cmake, ctest)"
build_dir=build/cmake
cmake -S . -B "$build_dir" -G Ninja \
  -DCMAKE_MAKE_PROGRAM="$(command -v ninja)" \
  -DCMAKE_PREFIX_PATH="$(python -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')" \
  -DPATCHSLIM_REQUIRE_NVCC="${PATCHSLIM_REQUIRE_NVCC:-0}" >/dev/null
cmake --build "$build_dir" -j "$(nproc)"
ctest --test-dir "$build_dir" --output-on-failure --no-tests=error

echo "==> all tests passed in $((SECONDS - start)) s (after the build)"

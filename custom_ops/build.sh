#!/usr/bin/env bash
# NORMFOLD_HARNESS=1 bash custom_ops/build.sh: build the CUDA harness, libnormfold_cuda_harness.so
# (CMake target normfold_cuda_harness: the CUDA kernels behind a C ABI, needs nvcc, not onnxruntime)
# into ${NORMFOLD_HARNESS_DIR:-custom_ops/build/harness}, for tests/test_cuda_ops.py and
# benchmarks/bench_cuda.py (carry that folder to a GPU machine without nvcc).
# NORMFOLD_CUDA_ARCHS="90" (or "86 90") overrides the CUDA architectures (CMake's
# NORMFOLD_CUDA_ARCHITECTURES, default 80 86 89 90); NORMFOLD_BUILD_JOBS the parallel jobs (default 2).
# The op libraries are built by installing normfold (pip install [-e] ., see README "Installation").
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
if [ "${NORMFOLD_HARNESS:-0}" != 1 ]; then
    echo "custom_ops/build.sh: the op libraries are built by pip: pip install --no-deps -e $(dirname "$HERE") (NORMFOLD_HARNESS=1 builds the CUDA harness)" >&2
    exit 2
fi
NVCC="$(command -v nvcc || true)"
[ -z "$NVCC" ] && [ -x /usr/local/cuda/bin/nvcc ] && NVCC=/usr/local/cuda/bin/nvcc
[ -n "$NVCC" ] || { echo "custom_ops/build.sh: nvcc not found: cannot build the CUDA harness" >&2; exit 1; }
command -v cmake >/dev/null || { echo "custom_ops/build.sh: cmake not found" >&2; exit 1; }
ARCHS=(-UNORMFOLD_CUDA_ARCHITECTURES)  # unset: CMakeLists.txt's default
[ -n "${NORMFOLD_CUDA_ARCHS:-}" ] && ARCHS=(-DNORMFOLD_CUDA_ARCHITECTURES="${NORMFOLD_CUDA_ARCHS// /;}")
dir="${NORMFOLD_HARNESS_DIR:-$HERE/build/harness}"
mkdir -p "$dir"
{ cmake -S "$HERE" -B "$dir" -DCMAKE_BUILD_TYPE=Release -DNORMFOLD_HARNESS_ONLY=ON -DNORMFOLD_CUDA=ON \
      -DCMAKE_CUDA_COMPILER="$NVCC" "${ARCHS[@]}" \
  && cmake --build "$dir" -j "${NORMFOLD_BUILD_JOBS:-2}" --target normfold_cuda_harness; } >"$dir.log" 2>&1 \
    || { echo "custom_ops/build.sh: compiling the CUDA harness failed; see $dir.log" >&2; exit 1; }
echo "custom_ops/build.sh: built $dir/libnormfold_cuda_harness.so"

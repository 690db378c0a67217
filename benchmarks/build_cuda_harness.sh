#!/usr/bin/env bash
# Build libnormfold_cuda_harness.so: the CUDA kernels of custom_ops/src/cuda_kernels.cu behind a small
# C ABI (custom_ops/src/cuda_harness.cu), for tests/test_cuda_ops.py and benchmarks/bench_cuda.py to
# call with torch CUDA tensors through ctypes (no onnxruntime-gpu needed). nvcc only, no CMake.
#
#   bash benchmarks/build_cuda_harness.sh [OUT_DIR]     (default custom_ops/build/harness)
#
# Same architectures as the op library (sm_80/86/89/90 + PTX), CUDA runtime linked statically, so the
# .so built here runs on a GPU machine without nvcc (carry OUT_DIR there). Env: NVCC, NORMFOLD_HARNESS_ARCHS
# (e.g. "90" for a faster single-architecture build).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT_DIR="${1:-$ROOT/custom_ops/build/harness}"
NVCC="${NVCC:-$(command -v nvcc || true)}"
[ -z "$NVCC" ] && [ -x /usr/local/cuda/bin/nvcc ] && NVCC=/usr/local/cuda/bin/nvcc
[ -n "$NVCC" ] || { echo "build_cuda_harness.sh: nvcc not found" >&2; exit 1; }

ARCHS="${NORMFOLD_HARNESS_ARCHS:-80 86 89 90}"
GENCODE=()
for a in $ARCHS; do GENCODE+=(-gencode "arch=compute_$a,code=sm_$a"); done
last="${ARCHS##* }"
GENCODE+=(-gencode "arch=compute_$last,code=compute_$last")  # PTX for newer GPUs

mkdir -p "$OUT_DIR"
SRC="$ROOT/custom_ops/src"
"$NVCC" -std=c++17 -O3 -shared -Xcompiler -fPIC,-fvisibility=hidden -cudart static "${GENCODE[@]}" \
    -I"$SRC" "$SRC/cuda_harness.cu" "$SRC/cuda_kernels.cu" -o "$OUT_DIR/libnormfold_cuda_harness.so.tmp"
mv "$OUT_DIR/libnormfold_cuda_harness.so.tmp" "$OUT_DIR/libnormfold_cuda_harness.so"
echo "build_cuda_harness.sh: built $OUT_DIR/libnormfold_cuda_harness.so"

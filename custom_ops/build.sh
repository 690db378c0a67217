#!/usr/bin/env bash
# Build normfold's onnxruntime custom-op libraries into normfold/_ops/.
#   libnormfold_ops.so       CPU kernels (always)
#   libnormfold_ops_cuda.so  CPU + CUDA kernels (only when nvcc is found)
# The onnxruntime C/C++ API headers come from Debian trixie's libonnxruntime-dev,
# downloaded with a private apt configuration and unpacked into
# custom_ops/third_party/ (nothing is installed). Safe to re-run.
#
# NORMFOLD_HARNESS=1 builds only the CUDA harness instead (CMake target normfold_cuda_harness, needs
# nvcc, not onnxruntime): libnormfold_cuda_harness.so in ${NORMFOLD_HARNESS_DIR:-custom_ops/build/harness},
# for tests/test_cuda_ops.py and benchmarks/bench_cuda.py (carry that folder to a GPU machine without nvcc).
# NORMFOLD_CUDA_ARCHS="90" (or "86 90") overrides the CUDA architectures of the CUDA builds (CMake's
# NORMFOLD_CUDA_ARCHITECTURES, default 80 86 89 90); NORMFOLD_BUILD_JOBS the parallel jobs.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
OUT="$(cd "$HERE/.." && pwd)/normfold/_ops"
TP="$HERE/third_party"
INCLUDE="$TP/usr/include/onnxruntime"
BUILD="$HERE/build"
JOBS="${NORMFOLD_BUILD_JOBS:-$(nproc 2>/dev/null || echo 2)}"

NVCC="$(command -v nvcc || true)"
[ -z "$NVCC" ] && [ -x /usr/local/cuda/bin/nvcc ] && NVCC=/usr/local/cuda/bin/nvcc
ARCHS=(-UNORMFOLD_CUDA_ARCHITECTURES)  # unset: CMakeLists.txt's default
[ -n "${NORMFOLD_CUDA_ARCHS:-}" ] && ARCHS=(-DNORMFOLD_CUDA_ARCHITECTURES="${NORMFOLD_CUDA_ARCHS// /;}")
build() {  # build DIR CUDA(ON|OFF) TARGET
    cmake -S "$HERE" -B "$1" -DCMAKE_BUILD_TYPE=Release -DORT_INCLUDE_DIR="$INCLUDE" "${ARCHS[@]}" \
        -DNORMFOLD_CUDA="$2" ${NVCC:+-DCMAKE_CUDA_COMPILER="$NVCC"} >"$1.log" 2>&1 \
        && cmake --build "$1" -j "$JOBS" --target "$3" >>"$1.log" 2>&1
}

if [ "${NORMFOLD_HARNESS:-0}" = 1 ]; then
    dir="${NORMFOLD_HARNESS_DIR:-$BUILD/harness}"
    [ -n "$NVCC" ] || { echo "custom_ops/build.sh: nvcc not found: cannot build the CUDA harness" >&2; exit 1; }
    command -v cmake >/dev/null || { echo "custom_ops/build.sh: cmake not found" >&2; exit 1; }
    mkdir -p "$dir"
    build "$dir" ON normfold_cuda_harness \
        || { echo "custom_ops/build.sh: compiling the CUDA harness failed; see $dir.log" >&2; exit 1; }
    echo "custom_ops/build.sh: built $dir/libnormfold_cuda_harness.so"
    exit 0
fi

mkdir -p "$OUT"
rm -f "$OUT/BUILD_FAILED.txt" "$OUT/CUDA_BUILD_FAILED.txt"

fail() {  # fail FILE REASON: one line on stderr and in FILE (read by `normfold doctor`)
    echo "custom_ops/build.sh: $2" >&2
    echo "$2" > "$OUT/$1"
}

fetch_headers() {
    local apt="$TP/apt"
    mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial"
    echo "deb http://deb.debian.org/debian trixie main" > "$apt/sources.list"
    local opts=(-o "Dir::Etc::SourceList=$apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
                -o "Dir::State::Lists=$apt/lists" -o "Dir::Cache=$apt/cache" -o APT::Sandbox::User=root)
    apt-get "${opts[@]}" -qq update >"$apt/log" 2>&1 || return 1
    (cd "$apt" && rm -f libonnxruntime-dev_*.deb && apt-get "${opts[@]}" -qq download libonnxruntime-dev) >>"$apt/log" 2>&1 || return 1
    dpkg -x "$apt"/libonnxruntime-dev_*.deb "$TP" && [ -f "$INCLUDE/onnxruntime_lite_custom_op.h" ]
}

if [ ! -f "$INCLUDE/onnxruntime_lite_custom_op.h" ]; then
    command -v apt-get >/dev/null && command -v dpkg >/dev/null \
        || { fail BUILD_FAILED.txt "apt-get/dpkg not found: cannot fetch the onnxruntime headers (libonnxruntime-dev)"; exit 1; }
    fetch_headers || { fail BUILD_FAILED.txt "downloading libonnxruntime-dev from Debian trixie failed (network?); see $TP/apt/log"; exit 1; }
fi
command -v cmake >/dev/null || { fail BUILD_FAILED.txt "cmake not found"; exit 1; }

mkdir -p "$BUILD"
if build "$BUILD/cpu" OFF normfold_ops; then
    cp "$BUILD/cpu/libnormfold_ops.so" "$OUT/libnormfold_ops.so.tmp" && mv "$OUT/libnormfold_ops.so.tmp" "$OUT/libnormfold_ops.so"
    echo "custom_ops/build.sh: built $OUT/libnormfold_ops.so"
else
    fail BUILD_FAILED.txt "compiling the CPU library failed; see $BUILD/cpu.log"; exit 1
fi

if [ -z "$NVCC" ]; then
    rm -f "$OUT/libnormfold_ops_cuda.so"
    echo "nvcc not found: CUDA kernels not built" > "$OUT/CUDA_BUILD_FAILED.txt"
elif build "$BUILD/cuda" ON normfold_ops_cuda; then
    cp "$BUILD/cuda/libnormfold_ops_cuda.so" "$OUT/libnormfold_ops_cuda.so.tmp" && mv "$OUT/libnormfold_ops_cuda.so.tmp" "$OUT/libnormfold_ops_cuda.so"
    echo "custom_ops/build.sh: built $OUT/libnormfold_ops_cuda.so"
else
    rm -f "$OUT/libnormfold_ops_cuda.so"  # not fatal: the CPU library is built
    fail CUDA_BUILD_FAILED.txt "compiling the CUDA library failed; see $BUILD/cuda.log"
fi

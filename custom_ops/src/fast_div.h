// k / d for 0 <= k < 2^31 by a multiply-high and a shift (Granlund-Montgomery), for the CUDA kernels'
// element -> channel map; host and device code (the harness tests it on the host).
#pragma once
#include <cstdint>

#ifdef __CUDACC__
#define NORMFOLD_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define NORMFOLD_HOST_DEVICE inline
#endif

namespace normfold::cuda {

/// mul = ceil(2^p / d) with p = 31 + ceil(log2 d), so that k / d = (k * mul) >> p: the error
/// k (mul - 2^p / d) / 2^p < 2^-ceil(log2 d) <= 1/d never reaches the next integer.
struct FastDiv {
  uint32_t d = 1, mul = 0, shift = 0;  // d = 1: mul unused

  FastDiv() = default;
  NORMFOLD_HOST_DEVICE explicit FastDiv(uint32_t divisor) : d(divisor) {
    if (d <= 1) return;
    uint32_t log2 = 0;
    while ((uint64_t(1) << log2) < d) ++log2;
    mul = uint32_t(((uint64_t(1) << (31 + log2)) + d - 1) / d);
    shift = log2 - 1;  // p - 32: the high word of k * mul, shifted
  }
  NORMFOLD_HOST_DEVICE uint32_t operator()(uint32_t k) const {
    return d == 1 ? k : uint32_t((uint64_t(k) * mul) >> 32) >> shift;
  }
};

}  // namespace normfold::cuda

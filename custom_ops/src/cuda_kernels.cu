// CUDA kernels of the normfold ops (see cuda_kernels.h). Statistics: per-thread Welford (or sums of
// squares) merged across the block with Chan's formula, so a large mean does not cancel the variance.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda_kernels.h"

namespace normfold::cuda {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <class T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

struct Stat {
  float n, mean, m2;  // uncentred statistics keep mean = 0 and m2 = sum of squares
};

__device__ __forceinline__ Stat merge(Stat a, Stat b) {
  const float n = a.n + b.n;
  if (n == 0.f) return a;
  const float d = b.mean - a.mean, f = b.n / n;
  return {n, a.mean + d * f, a.m2 + b.m2 + d * d * a.n * f};
}

__device__ __forceinline__ void add(Stat& s, float v, bool centered) {
  s.n += 1.f;
  if (centered) {
    const float d = v - s.mean;
    s.mean += d / s.n;
    s.m2 += d * (v - s.mean);
  } else {
    s.m2 += v * v;
  }
}

/// The block's merged statistics, returned to every thread.
__device__ Stat block_merge(Stat s) {
  __shared__ Stat warp_stats[32];
  __shared__ Stat total;
  for (int offset = 16; offset > 0; offset /= 2)
    s = merge(s, Stat{__shfl_down_sync(0xffffffffu, s.n, offset), __shfl_down_sync(0xffffffffu, s.mean, offset),
                      __shfl_down_sync(0xffffffffu, s.m2, offset)});
  if (threadIdx.x % 32 == 0) warp_stats[threadIdx.x / 32] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    Stat t = warp_stats[0];
    for (int w = 1; w < (blockDim.x + 31) / 32; ++w) t = merge(t, warp_stats[w]);
    total = t;
  }
  __syncthreads();
  return total;
}

template <class T>
__global__ void row_norm_kernel(RowNorm p) {
  const T* x = static_cast<const T*>(p.x) + blockIdx.x * p.size;
  T* y = static_cast<T*>(p.y) + blockIdx.x * p.size;
  const uint32_t size = uint32_t(p.size), spatial = uint32_t(p.spatial);
  Stat s{0.f, 0.f, 0.f};
  for (uint32_t k = threadIdx.x; k < size; k += blockDim.x) add(s, to_f(x[k]), p.centered);
  s = block_merge(s);
  const float rstd = rsqrtf(s.m2 / s.n + p.epsilon), mean = s.mean;
  const uint32_t first = uint32_t(blockIdx.x % p.period) * (size / spatial);
  const T *gamma = static_cast<const T*>(p.gamma), *beta = static_cast<const T*>(p.beta), *tau = static_cast<const T*>(p.tau);
  for (uint32_t k = threadIdx.x; k < size; k += blockDim.x) {
    const uint32_t c = first + k / spatial;
    float v = (to_f(x[k]) - mean) * rstd * (gamma ? to_f(gamma[c]) : 1.f) + (beta ? to_f(beta[c]) : 0.f);
    if (p.activation == 1) v = v / (1.f + __expf(-v));
    if (p.activation == 2) v = fmaxf(v, to_f(tau[c]));
    y[k] = from_f<T>(v);
  }
}

template <class T>
__global__ void channel_norm_kernel(const T* x, const T* gamma, const T* beta, T* y, int64_t n, int64_t c, int64_t s,
                                    float epsilon) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= n * s) return;
  const int64_t offset = (idx / s) * c * s + idx % s;  // adjacent threads read adjacent positions
  Stat st{0.f, 0.f, 0.f};
  for (int64_t ch = 0; ch < c; ++ch) add(st, to_f(x[offset + ch * s]), true);
  const float rstd = rsqrtf(st.m2 / st.n + epsilon);
  for (int64_t ch = 0; ch < c; ++ch)
    y[offset + ch * s] = from_f<T>((to_f(x[offset + ch * s]) - st.mean) * rstd * to_f(gamma[ch]) + (beta ? to_f(beta[ch]) : 0.f));
}

template <class T>
__global__ void weight_norm_kernel(const T* v, const T* g, T* w, int64_t outer, int64_t d, int64_t inner) {
  const int64_t j = blockIdx.x, total = outer * inner;
  Stat s{0.f, 0.f, 0.f};
  for (int64_t k = threadIdx.x; k < total; k += blockDim.x) add(s, to_f(v[((k / inner) * d + j) * inner + k % inner]), false);
  s = block_merge(s);
  const float factor = to_f(g[j]) * rsqrtf(s.m2);
  for (int64_t k = threadIdx.x; k < total; k += blockDim.x) {
    const int64_t at = ((k / inner) * d + j) * inner + k % inner;
    w[at] = from_f<T>(to_f(v[at]) * factor);
  }
}

std::string last_error() {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? "" : std::string("CUDA error: ") + cudaGetErrorString(e);
}

/// Calls f(T{}) with T the CUDA storage type of `dtype`.
template <class F>
std::string dispatch(Dtype dtype, F&& f) {
  switch (dtype) {
    case Dtype::f32: f(float{}); break;
    case Dtype::f16: f(__half{}); break;
    case Dtype::bf16: f(__nv_bfloat16{}); break;
  }
  return last_error();
}

}  // namespace

std::string row_norm(const RowNorm& p, Dtype dtype, void* stream) {
  if (p.count == 0 || p.size == 0) return "";
  if (p.size > INT32_MAX || p.count > INT32_MAX) return "normalized slice too large for the CUDA kernel";
  return dispatch(dtype, [&](auto t) {
    row_norm_kernel<decltype(t)><<<unsigned(p.count), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(p);
  });
}

std::string channel_norm(const void* x, const void* gamma, const void* beta, void* y, int64_t n, int64_t c, int64_t s,
                         float epsilon, Dtype dtype, void* stream) {
  if (n * s == 0 || c == 0) return "";
  return dispatch(dtype, [&](auto t) {
    using T = decltype(t);
    channel_norm_kernel<T><<<unsigned((n * s + kThreads - 1) / kThreads), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(x), static_cast<const T*>(gamma), static_cast<const T*>(beta), static_cast<T*>(y), n, c, s, epsilon);
  });
}

std::string weight_norm(const void* v, const void* g, void* w, int64_t outer, int64_t d, int64_t inner, Dtype dtype,
                        void* stream) {
  if (outer * d * inner == 0) return "";
  return dispatch(dtype, [&](auto t) {
    using T = decltype(t);
    weight_norm_kernel<T><<<unsigned(d), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(v), static_cast<const T*>(g), static_cast<T*>(w), outer, d, inner);
  });
}

}  // namespace normfold::cuda

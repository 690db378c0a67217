// CUDA kernels of the normfold ops (see cuda_kernels.h).
//
// Two kernels per normalization, one template over the storage type T (float, half, bfloat16):
// - on-chip: the slice (a row, or a C x 128-byte tile for channel-first LayerNorm) is copied once
//   into shared memory with cp.async, the statistics are two exact passes over shared memory, and the
//   output is written from shared memory: one global read, one global write.
// - two-pass: for slices too large for shared memory, a statistics pass (per-thread Welford merged
//   with Chan's formula) and a read/normalize/write pass over global memory.
// Global accesses are 16-byte packs where the address allows, scalars at the unaligned ends.
//
// Accuracy: centred statistics are taken around hi = the slice's first element and the mean is
// kept as hi + lo, so x - hi is exact for data near the mean (Sterbenz) and inputs like x + 1000
// keep full fp32 accuracy: y = ((x - hi) - lo) * rstd * gamma + beta.
//
// Fused adds (rows only): the residual `skip` is added as the row is read, rounded to T (on-chip: into the
// staged row, once; two-pass: in both reads, or the second reads the `sum` output the first wrote);
// the per-channel `add` joins each deviation, (x - hi) + (add_c - add_0), and is never written.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_pipeline.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "cuda_kernels.h"
#include "fast_div.h"

namespace normfold::cuda {
namespace {

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <class T> __device__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// ---- 16-byte packs

template <class T> constexpr uint32_t kVec = 16 / sizeof(T);  // elements per pack
template <class T> struct alignas(16) Pack { T v[kVec<T>]; };

__device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

/// Elements [0, n) of a row at p: a scalar head up to the first 16-byte boundary, `packs` aligned
/// packs from `head`, then a scalar tail from `tail`.
template <class T>
struct Split {
  uint32_t head, packs, tail, scalars;
  __device__ Split(const T* p, uint32_t n) {
    const uint32_t mis = uint32_t(reinterpret_cast<uintptr_t>(p) & 15) / sizeof(T);
    head = min(n, (kVec<T> - mis) % kVec<T>);
    packs = (n - head) / kVec<T>;
    tail = head + packs * kVec<T>;
    scalars = head + (n - tail);
  }
  __device__ uint32_t scalar(uint32_t i) const { return i < head ? i : tail + (i - head); }  // i < scalars
};

/// N floats from p[at..]: one 16-byte load when N is a pack and the address allows; `fill` for p null.
template <class T, uint32_t N>
__device__ __forceinline__ void load(const T* p, uint32_t at, float (&v)[N], float fill = 0.f) {
  if (p == nullptr) {
#pragma unroll
    for (uint32_t j = 0; j < N; ++j) v[j] = fill;
  } else if (N == kVec<T> && aligned16(p + at)) {
    const Pack<T> pk = *reinterpret_cast<const Pack<T>*>(p + at);
#pragma unroll
    for (uint32_t j = 0; j < N; ++j) v[j] = to_f(pk.v[j]);
  } else {
#pragma unroll
    for (uint32_t j = 0; j < N; ++j) v[j] = to_f(p[at + j]);
  }
}

template <class T>
__device__ __forceinline__ void store_pack(T* p, const float (&v)[kVec<T>]) {  // p 16-byte aligned
  Pack<T> pk;
#pragma unroll
  for (uint32_t j = 0; j < kVec<T>; ++j) pk.v[j] = from_f<T>(v[j]);
  *reinterpret_cast<Pack<T>*>(p) = pk;
}

/// Stores N floats at p[at..]: one 16-byte store when N is a pack and the address allows.
template <class T, uint32_t N>
__device__ __forceinline__ void store(T* p, uint32_t at, const float (&v)[N]) {
  if constexpr (N == kVec<T>) {
    if (aligned16(p + at)) return store_pack(p + at, v);
  }
#pragma unroll
  for (uint32_t j = 0; j < N; ++j) p[at + j] = from_f<T>(v[j]);
}

/// The row a norm reads: x, or x + skip rounded to T (the residual Add that SkipLayerNorm replaces).
template <class T>
struct Source {
  const T* x;
  const T* skip = nullptr;

  template <uint32_t N>
  __device__ __forceinline__ void read(uint32_t k, float (&v)[N]) const {
    load(x, k, v);
    if (skip == nullptr) return;
    float s[N];
    load(skip, k, s);
#pragma unroll
    for (uint32_t j = 0; j < N; ++j) v[j] = to_f(from_f<T>(v[j] + s[j]));
  }
  __device__ __forceinline__ float at(uint32_t k) const {
    float v[1];
    read(k, v);
    return v[0];
  }
};

// ---- statistics

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

/// The block's merged statistics (Chan), returned to every thread.
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
    for (uint32_t w = 1; w < (blockDim.x + 31) / 32; ++w) t = merge(t, warp_stats[w]);
    total = t;
  }
  __syncthreads();
  return total;
}

/// The block's sum of v, returned to every thread. Safe to call repeatedly.
__device__ float block_sum(float v) {
  __shared__ float warp_sums[32];
  __shared__ float total;
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = v;
  __syncthreads();
  if (threadIdx.x < 32) {
    v = threadIdx.x < (blockDim.x + 31) / 32 ? warp_sums[threadIdx.x] : 0.f;
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
    if (threadIdx.x == 0) total = v;
  }
  __syncthreads();
  return total;
}

// ---- normalize, affine, activation

/// An element's deviation from hi, the instance's first value (0 for uncentred norms): v - hi, plus the
/// per-channel add of BiasGroupNorm as add[c] - add[0] (add[0] folded into hi), so values near the mean
/// and adds near each other keep full accuracy. Element k is in channel k / spatial.
template <class T>
struct Deviation {
  float hi = 0.f;
  const T* add = nullptr;  // the instance's adds, one per channel; null: none
  float add0 = 0.f;        // add[0] when centred, else 0
  FastDiv spatial;

  __device__ __forceinline__ float of_channel(float v, uint32_t c) const {
    v -= hi;
    return add ? v + (to_f(add[c]) - add0) : v;
  }
  __device__ __forceinline__ float operator()(float v, uint32_t k) const {
    return add ? of_channel(v, spatial(k)) : v - hi;
  }
};

/// y = act((dev(x) - lo) * rstd * gamma_c + beta_c), element k using parameter first + k / spatial.
template <class T>
struct Affine {
  const T *gamma, *beta, *tau;  // may be null (tau only read for TLU)
  uint32_t first;
  Deviation<T> dev;
  float lo, rstd;
  Activation activation;

  __device__ __forceinline__ float finish(float d, float a, float b, float t) const {
    float v = (d - lo) * a + b;
    if (activation == Activation::kSilu) v = v / (1.f + __expf(-v));
    else if (activation == Activation::kTlu) v = fmaxf(v, t);
    return v;
  }
  __device__ __forceinline__ float at(float v, uint32_t c) const {  // c: the channel within the instance
    const uint32_t i = first + c;
    return finish(dev.of_channel(v, c), rstd * (gamma ? to_f(gamma[i]) : 1.f), beta ? to_f(beta[i]) : 0.f,
                  activation == Activation::kTlu ? to_f(tau[i]) : 0.f);
  }

  /// v = elements k .. k + N - 1 of the instance, normalized in place.
  template <uint32_t N>
  __device__ __forceinline__ void apply(float (&v)[N], uint32_t k) const {
    const uint32_t spatial = dev.spatial.d;
    if (spatial == 1) {  // a parameter per element (LayerNorm/RMSNorm rows): packs of parameters
      float g[N], b[N], t[N];
      load(gamma, first + k, g, 1.f);
      load(beta, first + k, b);
      load(activation == Activation::kTlu ? tau : static_cast<const T*>(nullptr), first + k, t);
#pragma unroll
      for (uint32_t j = 0; j < N; ++j) v[j] = finish(dev(v[j], k + j), rstd * g[j], b[j], t[j]);
      return;
    }
    uint32_t c = dev.spatial(k), r = k - c * spatial;
    if (r + N <= spatial) {  // one channel: one parameter load for the whole pack
      const uint32_t i = first + c;
      const float a = rstd * (gamma ? to_f(gamma[i]) : 1.f), b = beta ? to_f(beta[i]) : 0.f;
      const float t = activation == Activation::kTlu ? to_f(tau[i]) : 0.f;
#pragma unroll
      for (uint32_t j = 0; j < N; ++j) v[j] = finish(dev.of_channel(v[j], c), a, b, t);
      return;
    }
#pragma unroll
    for (uint32_t j = 0; j < N; ++j, ++r) {  // the pack crosses channels
      if (r == spatial) ++c, r = 0;
      v[j] = at(v[j], c);
    }
  }
};

/// The identity in place of an Affine: write_row copies (the Skip...Sum ops' sum output).
struct Copy {
  template <uint32_t N>
  __device__ __forceinline__ void apply(float (&)[N], uint32_t) const {}
};

/// y[0, n) = src[0, n) (the Skip...Sum ops' sum output, from the staged row); not inlined, so the sum's
/// registers do not crowd the normalizing code.
template <class T>
__device__ __noinline__ void copy_row(T* y, const T* src, uint32_t n);

/// Writes y[0, n) = f(src[0, n)); src reads the input row (global or shared memory).
template <class T, class F>
__device__ void write_row(T* y, const Source<T>& src, uint32_t n, const F& f) {
  constexpr uint32_t V = kVec<T>;
  const Split<T> sp(y, n);
  for (uint32_t u = threadIdx.x; u < sp.packs; u += blockDim.x) {
    const uint32_t k = sp.head + u * V;
    float v[V];
    src.read(k, v);
    f.apply(v, k);
    store_pack(y + k, v);
  }
  for (uint32_t u = threadIdx.x; u < sp.scalars; u += blockDim.x) {
    const uint32_t k = sp.scalar(u);
    float v[1];
    src.read(k, v);
    f.apply(v, k);
    y[k] = from_f<T>(v[0]);
  }
}

template <class T>
__device__ __noinline__ void copy_row(T* y, const T* src, uint32_t n) { write_row(y, Source<T>{.x = src}, n, Copy{}); }

// ---- rows: GroupNorm, FRN, last-axes LayerNorm / RMSNorm, WeightNorm(dim=0), and the fused adds

template <class T>
struct RowArgs {
  const T *x, *skip, *add, *gamma, *beta, *tau;
  T *y, *sum;
  uint32_t size, channels, period;  // channels = size / spatial per instance
  FastDiv spatial;
  float epsilon, inv_n;  // inv_n = 1/size (mean of squares) or 1 (WeightNorm: the L2 norm)
  bool centered;
  Activation activation;

  /// This block's instance: offset of its row, and its deviation from hi (the adds of its channels).
  __device__ size_t row() const { return size_t(blockIdx.x) * size; }
  __device__ Deviation<T> deviation(float hi) const {
    const T* a = add ? add + size_t(blockIdx.x) * channels : nullptr;
    return {.hi = hi, .add = a, .add0 = a && centered ? to_f(a[0]) : 0.f, .spatial = spatial};
  }
  /// Without the fused adds (kAdds false): the pointers known null, so that code is compiled out and the
  /// plain norms keep their registers.
  template <bool kAdds>
  __device__ void keep_adds() {
    if constexpr (!kAdds) skip = add = nullptr, sum = nullptr;
  }
  __device__ Affine<T> affine(const Deviation<T>& dev, float lo, float rstd) const {
    return {.gamma = gamma, .beta = beta, .tau = tau, .first = (blockIdx.x % period) * channels, .dev = dev,
            .lo = lo, .rstd = rstd, .activation = activation};
  }
};

/// One block per instance; the instance is staged in dynamic shared memory (size + 1 pack). With skip,
/// the staged row becomes the sum, rounded to T (and is copied to `sum` when that is set).
template <class T, bool kAdds>
__global__ void __launch_bounds__(1024) row_on_chip(RowArgs<T> p) {
  p.template keep_adds<kAdds>();
  extern __shared__ __align__(16) unsigned char smem[];
  constexpr uint32_t V = kVec<T>;
  const size_t row = p.row();
  const T* x = p.x + row;
  const uint32_t n = p.size;
  // buf[k] holds x[k] at the same offset within a 16-byte pack, so x's packs land on aligned slots.
  T* buf = reinterpret_cast<T*>(smem) + (reinterpret_cast<uintptr_t>(x) & 15) / sizeof(T);
  const Split<T> sp(x, n);
  for (uint32_t u = threadIdx.x; u < sp.packs; u += blockDim.x)  // all copies in flight at once
    __pipeline_memcpy_async(buf + sp.head + u * V, x + sp.head + u * V, 16);
  __pipeline_commit();
  for (uint32_t u = threadIdx.x; u < sp.scalars; u += blockDim.x) buf[sp.scalar(u)] = x[sp.scalar(u)];
  __pipeline_wait_prior(0);
  if (p.skip) {  // each thread adds skip to the slots it copied
    const Source<T> sum{.x = buf, .skip = p.skip + row};
    for (uint32_t u = threadIdx.x; u < sp.packs; u += blockDim.x) {
      float v[V];
      sum.read(sp.head + u * V, v);
      store_pack(buf + sp.head + u * V, v);
    }
    for (uint32_t u = threadIdx.x; u < sp.scalars; u += blockDim.x) buf[sp.scalar(u)] = from_f<T>(sum.at(sp.scalar(u)));
  }
  __syncthreads();
  if (p.sum) copy_row(p.sum + row, buf, n);

  const Deviation<T> dev = p.deviation(p.centered ? to_f(buf[0]) : 0.f);
  float lo = 0.f, q = 0.f;
  if (p.centered) {  // exact two-pass over shared memory, around hi = the row's first value
    float s = 0.f;
    for (uint32_t k = threadIdx.x; k < n; k += blockDim.x) s += dev(to_f(buf[k]), k);
    lo = block_sum(s) / float(n);
    for (uint32_t k = threadIdx.x; k < n; k += blockDim.x) {
      const float d = dev(to_f(buf[k]), k) - lo;
      q += d * d;
    }
  } else {
    for (uint32_t k = threadIdx.x; k < n; k += blockDim.x) {
      const float v = dev(to_f(buf[k]), k);
      q += v * v;
    }
  }
  const float rstd = rsqrtf(block_sum(q) * p.inv_n + p.epsilon);
  write_row(p.y + row, Source<T>{.x = buf}, n, p.affine(dev, lo, rstd));
}

/// One block per instance: statistics pass (which also writes `sum` when set), then read/normalize/write
/// pass, both over global memory.
template <class T, bool kAdds>
__global__ void __launch_bounds__(512) row_two_pass(RowArgs<T> p) {
  p.template keep_adds<kAdds>();
  constexpr uint32_t V = kVec<T>;
  const Source<T> src{.x = p.x + p.row(), .skip = p.skip ? p.skip + p.row() : nullptr};
  T* sum = p.sum ? p.sum + p.row() : nullptr;
  const uint32_t n = p.size;
  const Deviation<T> dev = p.deviation(p.centered ? src.at(0) : 0.f);
  Stat s{0.f, 0.f, 0.f};
  const Split<T> sp(src.x, n);
  for (uint32_t u = threadIdx.x; u < sp.packs; u += blockDim.x) {
    const uint32_t k = sp.head + u * V;
    float v[V];
    src.read(k, v);
    if (sum) store(sum, k, v);
#pragma unroll
    for (uint32_t j = 0; j < V; ++j) add(s, dev(v[j], k + j), p.centered);
  }
  for (uint32_t u = threadIdx.x; u < sp.scalars; u += blockDim.x) {
    const uint32_t k = sp.scalar(u);
    const float v = src.at(k);
    if (sum) sum[k] = from_f<T>(v);
    add(s, dev(v, k), p.centered);
  }
  s = block_merge(s);  // its __syncthreads also makes `sum` visible to the whole block
  write_row(p.y + p.row(), sum ? Source<T>{.x = sum} : src, n,
            p.affine(dev, s.mean, rsqrtf(s.m2 * p.inv_n + p.epsilon)));
}

// ---- channel-first LayerNorm: N x C x S, over C per (n, s)

template <class T>
struct ChanArgs {
  const T *x, *gamma, *beta;
  T* y;
  uint32_t c, s, tiles;  // tiles of positions per n
  float epsilon;
};

constexpr uint32_t kTileThreads = 256;
template <class T> constexpr uint32_t kTile = 128 / sizeof(T);  // positions per tile: a 128-byte line per channel

/// One block per tile of kTile positions of one n: the C x kTile tile is staged in shared memory
/// (each channel's segment is one contiguous 128-byte line), statistics per position are column
/// sums over shared memory, then the tile is written.
template <class T>
__global__ void __launch_bounds__(kTileThreads) channel_on_chip(ChanArgs<T> p) {
  constexpr uint32_t TS = kTile<T>, V = kVec<T>, G = kTileThreads / TS, PR = TS / V;  // G rows summed in parallel
  extern __shared__ __align__(16) unsigned char smem[];
  T* buf = reinterpret_cast<T*>(smem);  // [c][TS]
  __shared__ float part[G][TS], hi_s[TS], lo_s[TS], rstd_s[TS];
  const uint32_t n = blockIdx.x / p.tiles, s0 = (blockIdx.x % p.tiles) * TS, width = min(TS, p.s - s0);
  const size_t base = size_t(n) * p.c * p.s + s0;
  const T* x = p.x + base;
  T* y = p.y + base;
  // Packs only when every channel line starts on a 16-byte boundary, in x and in y.
  const bool vec = p.s % V == 0 && aligned16(p.x) && aligned16(p.y);
  if (vec) {
    for (uint32_t u = threadIdx.x; u < p.c * PR; u += kTileThreads) {
      const uint32_t ch = u / PR, j = (u % PR) * V;
      if (j < width) __pipeline_memcpy_async(buf + ch * TS + j, x + size_t(ch) * p.s + j, 16);
      else *reinterpret_cast<Pack<T>*>(buf + ch * TS + j) = Pack<T>{};  // past the end of the row
    }
    __pipeline_commit();
    __pipeline_wait_prior(0);
  } else {
    for (uint32_t e = threadIdx.x; e < p.c * TS; e += kTileThreads) {
      const uint32_t ch = e / TS, j = e % TS;
      buf[e] = j < width ? x[size_t(ch) * p.s + j] : T{};
    }
  }
  __syncthreads();

  const uint32_t col = threadIdx.x % TS, g = threadIdx.x / TS;
  auto column_sum = [&](float v) {  // sum over the G partial sums of this column
    part[g][col] = v;
    __syncthreads();
    float t = 0.f;
#pragma unroll
    for (uint32_t i = 0; i < G; ++i) t += part[i][col];
    __syncthreads();
    return t;
  };
  const float hi = to_f(buf[col]), inv_c = 1.f / float(p.c);
  float s = 0.f;
  for (uint32_t ch = g; ch < p.c; ch += G) s += to_f(buf[ch * TS + col]) - hi;
  const float lo = column_sum(s) * inv_c;
  float q = 0.f;
  for (uint32_t ch = g; ch < p.c; ch += G) {
    const float d = (to_f(buf[ch * TS + col]) - hi) - lo;
    q += d * d;
  }
  const float var = column_sum(q) * inv_c;
  if (g == 0) hi_s[col] = hi, lo_s[col] = lo, rstd_s[col] = rsqrtf(var + p.epsilon);
  __syncthreads();

  auto out = [&](float v, uint32_t ch, uint32_t j) {
    return ((v - hi_s[j]) - lo_s[j]) * rstd_s[j] * to_f(p.gamma[ch]) + (p.beta ? to_f(p.beta[ch]) : 0.f);
  };
  if (vec) {
    for (uint32_t u = threadIdx.x; u < p.c * PR; u += kTileThreads) {
      const uint32_t ch = u / PR, j = (u % PR) * V;
      if (j >= width) continue;
      float v[V];
      load(buf, ch * TS + j, v);
#pragma unroll
      for (uint32_t i = 0; i < V; ++i) v[i] = out(v[i], ch, j + i);
      store_pack(y + size_t(ch) * p.s + j, v);
    }
  } else {
    for (uint32_t e = threadIdx.x; e < p.c * TS; e += kTileThreads) {
      const uint32_t ch = e / TS, j = e % TS;
      if (j < width) y[size_t(ch) * p.s + j] = from_f<T>(out(to_f(buf[e]), ch, j));
    }
  }
}

/// One thread per (n, position), looping over C twice (adjacent threads read adjacent positions).
template <class T>
__global__ void channel_two_pass(ChanArgs<T> p, int64_t positions) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= positions) return;
  const int64_t offset = (idx / p.s) * p.c * p.s + idx % p.s;
  const float hi = to_f(p.x[offset]);
  Stat st{0.f, 0.f, 0.f};
  for (uint32_t ch = 0; ch < p.c; ++ch) add(st, to_f(p.x[offset + int64_t(ch) * p.s]) - hi, true);
  const float rstd = rsqrtf(st.m2 / st.n + p.epsilon);
  for (uint32_t ch = 0; ch < p.c; ++ch) {
    const int64_t at = offset + int64_t(ch) * p.s;
    p.y[at] = from_f<T>(((to_f(p.x[at]) - hi) - st.mean) * rstd * to_f(p.gamma[ch]) + (p.beta ? to_f(p.beta[ch]) : 0.f));
  }
}

// ---- WeightNorm over a strided slice (dim > 0; dim = 0 runs as rows)

template <class T>
__global__ void weight_norm_strided(const T* v, const T* g, T* w, int64_t outer, int64_t d, int64_t inner) {
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

// ---- host side

/// Shared memory a block may use on the current device (opt-in maximum), less room for static shared memory.
int64_t smem_budget() {
  int dev = 0, bytes = 48 << 10;
  if (cudaGetDevice(&dev) == cudaSuccess) cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  return int64_t(bytes) - 2048;
}

size_t elem_size(Dtype d) { return d == Dtype::f32 ? 4 : 2; }
int64_t row_bytes(int64_t size, Dtype d) { return size * int64_t(elem_size(d)) + 16; }  // + 1 pack for the offset
int64_t tile_bytes(int64_t c) { return c * 128; }

/// Lets `kernel` use more than the default 48 KB of dynamic shared memory. Always sets the same
/// value (the device budget), so concurrent callers cannot lower it under each other.
template <class K>
cudaError_t allow_smem(K kernel, int64_t bytes) {
  if (bytes <= (48 << 10)) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem_budget()));
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

uint32_t round_warp(int64_t v, uint32_t lo, uint32_t hi) {
  return uint32_t(std::min<int64_t>(hi, std::max<int64_t>(lo, (v + 31) / 32 * 32)));
}

std::string rows(const RowNorm& p, float inv_n, Dtype dtype, void* stream, Path path) {
  if (p.count == 0 || p.size == 0) return "";
  if (p.size > INT32_MAX || p.count > INT32_MAX || p.period > INT32_MAX)
    return "normalized slice too large for the CUDA kernel";
  const int64_t bytes = row_bytes(p.size, dtype);
  const bool fits = bytes <= smem_budget();
  if (path == Path::on_chip && !fits)
    return "a slice of " + std::to_string(bytes) + " bytes does not fit in shared memory (" +
           std::to_string(smem_budget()) + " bytes)";
  const bool on_chip = path == Path::on_chip || (path == Path::automatic && fits);
  const int64_t packs = p.size / int64_t(16 / elem_size(dtype)) + 1;
  const auto s = static_cast<cudaStream_t>(stream);
  return dispatch(dtype, [&](auto t) {
    using T = decltype(t);
    const RowArgs<T> a{.x = static_cast<const T*>(p.x), .skip = static_cast<const T*>(p.skip),
                       .add = static_cast<const T*>(p.add), .gamma = static_cast<const T*>(p.gamma),
                       .beta = static_cast<const T*>(p.beta), .tau = static_cast<const T*>(p.tau),
                       .y = static_cast<T*>(p.y), .sum = static_cast<T*>(p.sum), .size = uint32_t(p.size),
                       .channels = uint32_t(p.size / p.spatial), .period = uint32_t(p.period),
                       .spatial = FastDiv(uint32_t(p.spatial)), .epsilon = p.epsilon, .inv_n = inv_n,
                       .centered = p.centered, .activation = p.activation};
    const bool adds = p.skip || p.add || p.sum;
    if (on_chip) {
      const auto kernel = adds ? row_on_chip<T, true> : row_on_chip<T, false>;
      if (allow_smem(kernel, bytes) != cudaSuccess) return;  // reported by last_error
      // ~2 packs per thread: enough threads to keep the copies and the writes in flight
      kernel<<<unsigned(p.count), round_warp((packs + 1) / 2, 32, 1024), size_t(bytes), s>>>(a);
    } else {
      const auto kernel = adds ? row_two_pass<T, true> : row_two_pass<T, false>;
      kernel<<<unsigned(p.count), round_warp(packs, 32, 512), 0, s>>>(a);
    }
  });
}

}  // namespace

std::string row_norm(const RowNorm& p, Dtype dtype, void* stream, Path path) {
  return rows(p, p.size ? 1.f / float(p.size) : 0.f, dtype, stream, path);
}
std::string row_norm(const RowNorm& p, Dtype dtype, void* stream) { return row_norm(p, dtype, stream, Path::automatic); }

std::string channel_norm(const void* x, const void* gamma, const void* beta, void* y, int64_t n, int64_t c, int64_t s,
                         float epsilon, Dtype dtype, void* stream, Path path) {
  if (n * s == 0 || c == 0) return "";
  if (s == 1)  // [N, C]: rows of C contiguous elements, a parameter per element
    return row_norm(RowNorm{.x = x, .gamma = gamma, .beta = beta, .y = y, .count = n, .size = c, .epsilon = epsilon},
                    dtype, stream, path);
  if (c > INT32_MAX || s > INT32_MAX || n * s / 16 > INT32_MAX) return "tensor too large for the CUDA kernel";
  const bool fits = tile_bytes(c) <= smem_budget();
  if (path == Path::on_chip && !fits) return "C = " + std::to_string(c) + " channels do not fit in shared memory";
  const bool on_chip = path == Path::on_chip || (path == Path::automatic && fits);
  const auto st = static_cast<cudaStream_t>(stream);
  return dispatch(dtype, [&](auto t) {
    using T = decltype(t);
    const uint32_t tiles = uint32_t((s + kTile<T> - 1) / kTile<T>);
    const ChanArgs<T> a{.x = static_cast<const T*>(x), .gamma = static_cast<const T*>(gamma),
                        .beta = static_cast<const T*>(beta), .y = static_cast<T*>(y), .c = uint32_t(c),
                        .s = uint32_t(s), .tiles = tiles, .epsilon = epsilon};
    if (on_chip) {
      if (allow_smem(channel_on_chip<T>, tile_bytes(c)) != cudaSuccess) return;  // reported by last_error
      channel_on_chip<T><<<unsigned(tiles * n), kTileThreads, size_t(tile_bytes(c)), st>>>(a);
    } else {
      channel_two_pass<T><<<unsigned((n * s + 255) / 256), 256, 0, st>>>(a, n * s);
    }
  });
}
std::string channel_norm(const void* x, const void* gamma, const void* beta, void* y, int64_t n, int64_t c, int64_t s,
                         float epsilon, Dtype dtype, void* stream) {
  return channel_norm(x, gamma, beta, y, n, c, s, epsilon, dtype, stream, Path::automatic);
}

std::string weight_norm(const void* v, const void* g, void* w, int64_t outer, int64_t d, int64_t inner, Dtype dtype,
                        void* stream) {
  if (outer * d * inner == 0) return "";
  if (outer == 1)  // dim = 0: d contiguous rows, w = g_j v / sqrt(sum v^2): an uncentred row norm without the 1/n
    return rows(RowNorm{.x = v, .gamma = g, .y = w, .count = d, .size = inner, .spatial = inner, .period = d,
                        .centered = false},
                1.f, dtype, stream, Path::automatic);
  return dispatch(dtype, [&](auto t) {
    using T = decltype(t);
    weight_norm_strided<T><<<unsigned(d), 256, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(v), static_cast<const T*>(g), static_cast<T*>(w), outer, d, inner);
  });
}

bool row_fits_on_chip(int64_t size, Dtype dtype) { return row_bytes(size, dtype) <= smem_budget(); }
bool channel_fits_on_chip(int64_t c, Dtype dtype) { return c > 0 && tile_bytes(c) <= smem_budget(); }

}  // namespace normfold::cuda

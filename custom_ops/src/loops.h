// The hot loops of the CPU kernels (statistics, the fused write pass with its activation, the
// LayerNorm row and channel-first loops) and their typed entry points.
#pragma once
#include <algorithm>
#include <cstdint>

#include "activation.h"
#include "activation_math.h"
#include "dtype.h"
#include "statistics.h"

namespace normfold {

// Every kernel spends its time in these loops. They are written once (namespace simd) and
// compiled three times by cpu_loops.cc: for baseline x86-64 (SSE2), with AVX2 (+FMA) and with
// AVX-512; `loops<A>()` gives the variant this CPU runs. Sums run in kLanes independent lanes added
// in a fixed order, so they vectorise without -ffast-math and give the same result on every CPU.

template <class A>
struct Loops {
  Moments (*moments)(const A* x, int64_t n);    // centred statistics of x[0, n)
  double (*sum_squares)(const A* x, int64_t n);  // Σx²
  /// out = act((in - shift)·a + b)
  void (*affine)(const A* in, A* out, int64_t n, A shift, A a, A b, Activation act, A tau);
  /// out[k] = ((in[k] - shift)·r + offset)·g[k] (+ b[k] unless b is null): last-axes LayerNorm, RMSNorm
  void (*scale_shift)(const A* in, A* out, int64_t n, A shift, A r, A offset, const A* g, const A* b);
  /// channel-first LayerNorm, per position i of `count` ≤ kRowsAtOnce channel rows: with d = rows[r][i] - shift[i]
  /// in double, dsum[i] += Σ_r d and sq[i] += Σ_r d²
  void (*add_moments)(double* dsum, double* sq, const A* const* rows, int count, const A* shift, int64_t n);
  /// out = ((in - shift)·rstd + offset)·g + b
  void (*normalize)(const A* in, A* out, int64_t n, const A* shift, const A* rstd, const A* offset, A g, A b);
  /// out = a + b (out may be a): the Skip ops' sum
  void (*add)(const A* a, const A* b, A* out, int64_t n);
};
constexpr int kRowsAtOnce = 4;  // channel rows add_moments takes in one pass over its accumulators

template <class A>
const Loops<A>& loops();  // instantiated for float and double in cpu_loops.cc
extern template const Loops<float>& loops();
extern template const Loops<double>& loops();

namespace simd {
#define NORMFOLD_LOOP inline __attribute__((always_inline))  // inlined into each ISA's copy

template <class A>
constexpr int64_t kLanes = 128 / sizeof(A);  // two cache lines: 2 AVX-512 / 4 AVX / 8 SSE registers per sum

/// Σ acc[0, kLanes), pairwise in a fixed order.
template <class A>
NORMFOLD_LOOP A total(A* acc) {
#pragma GCC unroll 8
  for (int64_t w = kLanes<A> / 2; w > 0; w /= 2)
#pragma GCC unroll 16
    for (int64_t j = 0; j < w; ++j) acc[j] += acc[j + w];
  return acc[0];
}

template <class A>
constexpr int64_t kPrefetchAhead = 4096 / sizeof(A);  // elements: a streaming read asks for its data 4 KB ahead

/// Asks for the cache lines of x[kPrefetchAhead, kPrefetchAhead + kLanes): a loop over lanes calls it once a step.
template <class A>
NORMFOLD_LOOP void prefetch_lanes(const A* x) {
#pragma GCC unroll 4
  for (size_t line = 0; line < kLanes<A> * sizeof(A); line += 64)
    __builtin_prefetch(reinterpret_cast<const char*>(x + kPrefetchAhead<A>) + line);
}

/// Σ f(x[i]) over i in [0, n), in lanes, prefetched ahead like centred_sums.
template <class A, class F>
NORMFOLD_LOOP A sum(const A* x, int64_t n, F f) {
  constexpr int64_t L = kLanes<A>;
  A acc[L] = {};
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    prefetch_lanes(x + i);
#pragma omp simd
    for (int64_t j = 0; j < L; ++j) acc[j] += f(x[i + j]);
  }
  A tail = 0;
  for (; i < n; ++i) tail += f(x[i]);
  return total(acc) + tail;
}

/// Σd and Σd² over x[0, n) with d = x - shift, in lanes, with the data prefetched ahead: in a single
/// pass over memory, the hardware prefetcher alone leaves the loop waiting (measured 0.54x of a copy's time
/// without, 0.39x with, on 16.8 MB).
template <class A>
struct CentredSums {
  A ds, q;
};
template <class A>
NORMFOLD_LOOP CentredSums<A> centred_sums(const A* x, int64_t n, A shift) {
  constexpr int64_t L = kLanes<A>;
  A ds[L] = {}, q[L] = {};
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    prefetch_lanes(x + i);
#pragma omp simd
    for (int64_t j = 0; j < L; ++j) {
      const A d = x[i + j] - shift;
      ds[j] += d;
      q[j] += d * d;
    }
  }
  A ds_tail = 0, q_tail = 0;
  for (; i < n; ++i) {
    const A d = x[i] - shift;
    ds_tail += d;
    q_tail += d * d;
  }
  return {total(ds) + ds_tail, total(q) + q_tail};
}

/// Statistics of one block x[0, len) (len ≤ kBlock) from its deviations from `shift`.
template <class A>
NORMFOLD_LOOP Moments block_moments(const A* x, int64_t len, A shift) {
  const CentredSums<A> c = centred_sums(x, len, shift);
  const double ds = double(c.ds), q = double(c.q);
  return {double(len), double(shift) + ds / len, q - ds * ds / len};
}

/// Mean and squared deviations of x[0, n), in blocks of kBlock merged with Chan's formula. The first
/// block takes two passes (its mean, then the deviations from it, from L1), so a large mean (x + 1000)
/// does not cancel the variance away; every later block takes one, its deviations from the running mean.
/// The rounding then stays relative to the total m2: by Cauchy-Schwarz, Σ_b len_b·(mean_b - running mean)²
/// over equal blocks is at most (4 + 2·ln(blocks))·m2.
template <class A>
NORMFOLD_LOOP Moments moments(const A* x, int64_t n) {
  if (n <= 0) return {};
  const int64_t first = std::min(kBlock, n);
  Moments m = block_moments(x, first, sum(x, first, [](A v) { return v; }) / A(first));
  for (int64_t off = first; off < n; off += kBlock) m.merge(block_moments(x + off, std::min(kBlock, n - off), A(m.mean)));
  return m;
}

template <class A>
NORMFOLD_LOOP double sum_squares(const A* x, int64_t n) {
  double s = 0;
  for (int64_t off = 0; off < n; off += kBlock) s += sum(x + off, std::min(kBlock, n - off), [](A v) { return v * v; });
  return s;
}

/// out[i] = f(i) for i in [0, n): the elements before the first 64-byte boundary of `out` first, so that
/// the vector stores do not straddle cache lines (large numpy arrays start 16 bytes past one; measured
/// 15-20% on the write pass). Element-wise, so the split does not change any result. `ahead`: inputs
/// read from memory (not from a cache a pass before), prefetched like sum()'s.
template <class A, class F, class... In>
NORMFOLD_LOOP void elementwise(A* out, int64_t n, F f, const In*... ahead) {
  const uintptr_t misaligned = reinterpret_cast<uintptr_t>(out) % 64;
  const int64_t head = misaligned % sizeof(A) ? 0 : std::min<int64_t>(n, int64_t((64 - misaligned) % 64 / sizeof(A)));
  for (int64_t i = 0; i < head; ++i) out[i] = f(i);
  int64_t done = head;
  if constexpr (sizeof...(In) > 0) {
    constexpr int64_t L = kLanes<A>;
    for (; done + L <= n; done += L) {
      (prefetch_lanes(ahead + done), ...);
#pragma omp simd
      for (int64_t i = done; i < done + L; ++i) out[i] = f(i);
    }
  }
#pragma omp simd
  for (int64_t i = done; i < n; ++i) out[i] = f(i);
}

/// kFma: the SiLU's multiply-adds are fused (the AVX2 / AVX-512 copies; activation_math.h).
template <class A, bool kFma>
NORMFOLD_LOOP void affine(const A* in, A* out, int64_t n, A shift, A a, A b, Activation act, A tau) {
  auto apply = [&](auto f) { elementwise(out, n, [&](int64_t i) { return f((in[i] - shift) * a + b); }); };
  if (act == Activation::kSilu) apply(Silu<kFma>{});
  else if (act == Activation::kTlu) apply(Tlu<A>{tau});
  else apply(Identity{});
}

template <class A>
NORMFOLD_LOOP void scale_shift(const A* in, A* out, int64_t n, A shift, A r, A offset, const A* g, const A* b) {
  if (b) elementwise(out, n, [&](int64_t i) { return ((in[i] - shift) * r + offset) * g[i] + b[i]; });
  else elementwise(out, n, [&](int64_t i) { return ((in[i] - shift) * r + offset) * g[i]; });
}

template <int K, class A>
NORMFOLD_LOOP void add_moments_of(double* dsum, double* sq, const A* const* rows, const A* shift, int64_t n) {
  const A* r[K];
  for (int k = 0; k < K; ++k) r[k] = rows[k];
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const double at = double(shift[i]);
    double s = 0, q = 0;
#pragma GCC unroll 4
    for (int k = 0; k < K; ++k) {
      const double d = double(r[k][i]) - at;  // exact for float rows
      s += d;
      q += d * d;
    }
    dsum[i] += s;
    sq[i] += q;
  }
}

template <class A>
NORMFOLD_LOOP void add_moments(double* dsum, double* sq, const A* const* rows, int count, const A* shift, int64_t n) {
  static_assert(kRowsAtOnce == 4);
  if (count == 4) add_moments_of<4>(dsum, sq, rows, shift, n);
  else if (count == 3) add_moments_of<3>(dsum, sq, rows, shift, n);
  else if (count == 2) add_moments_of<2>(dsum, sq, rows, shift, n);
  else if (count == 1) add_moments_of<1>(dsum, sq, rows, shift, n);
}

template <class A>
NORMFOLD_LOOP void normalize(const A* in, A* out, int64_t n, const A* shift, const A* rstd, const A* offset, A g, A b) {
  elementwise(out, n, [&](int64_t i) { return ((in[i] - shift[i]) * rstd[i] + offset[i]) * g + b; });
}

template <class A>
NORMFOLD_LOOP void add(const A* a, const A* b, A* out, int64_t n) {
  elementwise(out, n, [&](int64_t i) { return a[i] + b[i]; }, a, b);
}
}  // namespace simd

// ---------------------------------------------------------------- typed entry points

/// Centred statistics of x[0, n) for any storage type.
template <class T>
Moments moments(const T* x, int64_t n) {
  using A = Acc<T>;
  if constexpr (std::is_same_v<T, A>) {
    return loops<A>().moments(x, n);
  } else {
    alignas(64) A buf[kBlock];
    Moments m;
    for (int64_t off = 0; off < n; off += kBlock) {
      const int64_t len = std::min(kBlock, n - off);
      m.merge(loops<A>().moments(as_acc(x + off, buf, len), len));
    }
    return m;
  }
}

/// Uncentred statistics of x[0, n): mean = 0, m2 = Σx².
template <class T>
Moments squares(const T* x, int64_t n) {
  using A = Acc<T>;
  if constexpr (std::is_same_v<T, A>) return {double(n), 0.0, loops<A>().sum_squares(x, n)};
  alignas(64) A buf[kBlock];
  double total = 0;
  for (int64_t off = 0; off < n; off += kBlock) {
    const int64_t len = std::min(kBlock, n - off);
    total += loops<A>().sum_squares(as_acc(x + off, buf, len), len);
  }
  return {double(n), 0.0, total};
}

/// y = act((x - shift)·a + b) over x[0, n): the fused write pass of per-channel normalizations.
template <class T>
void affine(const T* x, T* y, int64_t n, Acc<T> shift, Acc<T> a, Acc<T> b, Activation act = Activation::kNone,
            Acc<T> tau = 0) {
  const auto& L = loops<Acc<T>>();
  map_blocks(x, y, n, [&](const Acc<T>* in, Acc<T>* out, int64_t len, int64_t) { L.affine(in, out, len, shift, a, b, act, tau); });
}

}  // namespace normfold

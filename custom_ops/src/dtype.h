// Storage types (float, double, float16, bfloat16) and the arithmetic type each computes in:
// branch-free conversions that vectorise, and conversion of a tensor in blocks that stay in L1.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "ort_api.h"

namespace normfold {

/// Arithmetic type for storage type T: double for double, float otherwise.
template <class T>
using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;

inline float bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t float_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

/// Branch-free IEEE half <-> float (round to nearest even), so conversion loops vectorise.
inline float half_to_float(uint16_t h) {
  const uint32_t em = h & 0x7fffu;
  const uint32_t u = float_to_bits(bits_to_float(em << 13) * 0x1p112f) | (em >= 0x7c00u ? 0x7f800000u : 0u);
  return bits_to_float(u | (uint32_t(h & 0x8000u) << 16));
}
inline uint16_t float_to_half(float f) {
  const uint32_t u = float_to_bits(f), sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
  const uint32_t sub = float_to_bits(bits_to_float(a) + 0.5f) - float_to_bits(0.5f);  // |f| < 2^-14
  const uint32_t norm = (a + 0xc8000fffu + ((a >> 13) & 1u)) >> 13;                   // rebias, round
  const uint32_t big = a > 0x7f800000u ? 0x7e00u : 0x7c00u;                           // NaN / overflow
  return uint16_t(sign | (a >= 0x47800000u ? big : a < 0x38800000u ? sub : norm));
}
inline float bf16_to_float(uint16_t h) { return bits_to_float(uint32_t(h) << 16); }
inline uint16_t float_to_bf16(float f) {
  const uint32_t u = float_to_bits(f);
  return (u & 0x7fffffffu) > 0x7f800000u ? uint16_t((u >> 16) | 0x40u) : uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

inline uint16_t bits(Ort::Float16_t v) { uint16_t b; std::memcpy(&b, &v, 2); return b; }
inline uint16_t bits(Ort::BFloat16_t v) { uint16_t b; std::memcpy(&b, &v, 2); return b; }

/// One value of storage type T as its arithmetic type.
template <class T>
Acc<T> to_acc(T v) {
  if constexpr (std::is_same_v<T, Ort::Float16_t>) return half_to_float(bits(v));
  else if constexpr (std::is_same_v<T, Ort::BFloat16_t>) return bf16_to_float(bits(v));
  else return v;
}

/// Convert n values between storage type T and its arithmetic type.
template <class T>
void load(const T* src, Acc<T>* dst, int64_t n) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = std::is_same_v<T, Ort::Float16_t> ? half_to_float(s[i]) : bf16_to_float(s[i]);
}
template <class T>
void store(const Acc<T>* src, T* dst, int64_t n) {
  uint16_t* d = reinterpret_cast<uint16_t*>(dst);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) d[i] = std::is_same_v<T, Ort::Float16_t> ? float_to_half(src[i]) : float_to_bf16(src[i]);
}

constexpr int64_t kBlock = 1024;  // elements converted / reduced at a time (stays in L1)

/// `x` as its arithmetic type: x itself when T is float/double, else converted into `buf` (≥ n values).
template <class T>
const Acc<T>* as_acc(const T* x, Acc<T>* buf, int64_t n) {
  if constexpr (std::is_same_v<T, Acc<T>>) {
    return x;
  } else {
    load(x, buf, n);
    return buf;
  }
}

/// A whole parameter tensor as its arithmetic type (a view when no conversion is needed).
template <class T>
const Acc<T>* acc_values(const T* x, int64_t n, std::vector<Acc<T>>& storage) {
  if constexpr (std::is_same_v<T, Acc<T>>) return x;
  storage.resize(size_t(n));
  return as_acc(x, storage.data(), n);
}

/// Calls f(in, out, len, offset) on blocks of x[0, n) (of type T, or already in arithmetic type) in
/// arithmetic type; `out` is stored to y.
template <class In, class T, class F>
void map_blocks(const In* x, T* y, int64_t n, F&& f) {
  using A = Acc<T>;
  static_assert(std::is_same_v<In, T> || std::is_same_v<In, A>);
  alignas(64) A in_buf[kBlock], out_buf[kBlock];
  for (int64_t off = 0; off < n; off += kBlock) {
    const int64_t len = std::min(kBlock, n - off);
    const A* in;
    if constexpr (std::is_same_v<In, A>) in = x + off;
    else in = as_acc(x + off, in_buf, len);
    if constexpr (std::is_same_v<T, A>) {
      f(in, y + off, len, off);
    } else {
      f(in, out_buf, len, off);
      store(out_buf, y + off, len);
    }
  }
}

}  // namespace normfold

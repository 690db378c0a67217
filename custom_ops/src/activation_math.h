// The activations the CPU write pass fuses (activation.h names them), as functors the hot loops
// inline into their `#pragma omp simd` loops.
//
// SiLU in float: y = x / (1 + exp(-x)), with exp by range reduction and a degree-5 polynomial
// (below), so the whole activation vectorises. Only + - × / and compares: with -ffp-contract=off
// the baseline x86-64, the AVX2+FMA and the AVX-512 loops give the same bits. Accuracy (tested against float64
// over every float exponent): relative error ≤ 3e-7 for x ≥ -88.37; below, |SiLU(x)| < 4e-37 and
// the result is -0, also for x = -inf (the limit); SiLU(+inf) = +inf, NaN stays NaN.
#pragma once
#include <cmath>
#include <cstdint>
#include <limits>

#include "dtype.h"

namespace normfold {

/// a·b + c: one rounding with kFma (an FMA instruction in the AVX2 / AVX-512 loops), else two.
template <bool kFma>
inline float mul_add(float a, float b, float c) {
  if constexpr (kFma) return __builtin_fmaf(a, b, c);
  else return a * b + c;
}

struct Identity {
  template <class A> A operator()(A v) const { return v; }
};

/// exp(-x) for -x in [kMin, kMax] (the caller clamps or discards the rest). -x = n·ln2 + t with n an
/// integer and |t| ≤ ln2/2; exp(t) = 1 + t·p(t) with p of degree 4, minimax for the relative error on
/// [-ln2/2 - 1e-5, ln2/2 + 1e-5] (fitted for normfold by Lawson's algorithm; 9.5e-8 with these float
/// coefficients); 2^n is written into the exponent bits. Written in u = -t, so that -x is never formed
/// (one instruction less per vector; the same bits as evaluating it in t).
struct ExpMinus {
  static constexpr float kMin = -87.33f;  // n ≥ -126: 2^n is a normal float
  static constexpr float kMax = 88.37f;   // n ≤ 127

  template <bool kFma>
  static float of(float x) {
    constexpr float kMinusLog2e = -0x1.715476p+0f;
    constexpr float kMagic = 0x1.8p23f + 127.f;  // adding it rounds to an integer, held in the low bits as n + 127
    constexpr float kLn2Hi = 0x1.62e4p-1f;       // ln2 in 15 bits: n·kLn2Hi is exact for |n| < 512
    constexpr float kLn2Lo = 0x1.7f7d1cp-20f;    // ln2 - kLn2Hi
    constexpr float c1 = 0x1.fffff6p-1f, c2 = 0x1.fffdc6p-2f, c3 = 0x1.555a6ap-3f, c4 = 0x1.573a5cp-5f,
                    c5 = 0x1.0fa830p-7f;
    const float biased = mul_add<kFma>(x, kMinusLog2e, kMagic);
    const float s = bits_to_float(float_to_bits(biased) << 23);  // 2^n
    const float n = biased - kMagic;
    // -t: an exact first step (n·kLn2Hi is exact, then Sterbenz), then the small correction
    const float u = mul_add<kFma>(n, kLn2Lo, mul_add<kFma>(n, kLn2Hi, x));
    float p = c5;  // p(t) by Horner, each p·t + c written as c - p·u
    p = mul_add<kFma>(-p, u, c4);
    p = mul_add<kFma>(-p, u, c3);
    p = mul_add<kFma>(-p, u, c2);
    p = mul_add<kFma>(-p, u, c1);
    return mul_add<kFma>(-u, p, 1.f) * s;
  }
};

/// x·sigmoid(x) = x / (1 + exp(-x)).
template <bool kFma>
struct Silu {
  static float silu(float v) {
    // x is clamped from above only (a compare, so NaN passes through): below -kMax the result is
    // replaced by -0 anyway, and clamping there would let the compiler compute x / (1 + exp(kMax))
    // for every lane, whose denormal results cost a microcode assist each (measured 14x slower).
    const float m = v > -ExpMinus::kMin ? -ExpMinus::kMin : v;
    const float y = v / (1.f + ExpMinus::of<kFma>(m));
    return v < -ExpMinus::kMax ? -0.f : y;
  }
  static double silu(double v) { return v < -std::numeric_limits<double>::max() ? -0.0 : v / (1.0 + std::exp(-v)); }
  template <class A> A operator()(A v) const { return silu(v); }
};

/// Thresholded linear unit max(x, tau) of Filter Response Normalization.
template <class A>
struct Tlu {
  A tau;
  A operator()(A v) const { return v > tau ? v : tau; }
};

}  // namespace normfold

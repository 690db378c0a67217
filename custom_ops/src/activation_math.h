// The activations the CPU write pass fuses (activation.h names them), as functors the hot loops inline.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "dtype.h"

namespace normfold {

struct Identity {
  template <class A> A operator()(A v) const { return v; }
};

/// x·sigmoid(x) with a vectorisable exp (Cephes polynomial, ~2 ulp) for float.
struct Silu {
  static float exp_(float x) {
    x = std::min(std::max(x, -87.3f), 88.7f);
    const float n = (x * 1.44269504f + 12582912.0f) - 12582912.0f;  // round(x / ln2)
    const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    return p * bits_to_float(uint32_t(int32_t(n) + 127) << 23);
  }
  static double exp_(double x) { return std::exp(x); }
  template <class A> A operator()(A v) const { return v / (A(1) + exp_(-v)); }
};

/// Thresholded linear unit max(x, tau) of Filter Response Normalization.
template <class A>
struct Tlu {
  A tau;
  A operator()(A v) const { return v > tau ? v : tau; }
};

}  // namespace normfold

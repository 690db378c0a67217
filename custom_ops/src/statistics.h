// Numerically stable statistics of a normalization: moments merged with Chan's formula, and the
// mean split in two so that inputs far from zero keep their accuracy.
#pragma once

namespace normfold {

/// Count, mean and sum of squared deviations; merged with Chan's formula, in double.
/// Uncentred statistics (RMS, FRN, norms) use mean = 0 and m2 = Σx².
struct Moments {
  double n = 0, mean = 0, m2 = 0;
  void merge(const Moments& o) {
    if (o.n == 0) return;
    const double total = n + o.n;
    const double delta = o.mean - mean;
    mean += delta * (o.n / total);
    m2 += o.m2 + delta * delta * (n * o.n / total);
    n = total;
  }
  double variance() const { return m2 / n; }
};

/// The mean split as hi + lo: hi is exact in A, so (x - hi) is exact for x near the mean and
/// lo is folded into the affine offset (keeps fp32 results accurate when mean ≫ std).
template <class A>
struct SplitMean {
  A hi;
  double lo;
  explicit SplitMean(double mean) : hi(A(mean)), lo(mean - double(A(mean))) {}
};

}  // namespace normfold

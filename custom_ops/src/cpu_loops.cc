// The hot loops of loops.h (namespace simd) compiled for baseline x86-64 and, on x86-64,
// once more with AVX2 + FMA; loops<A>() picks the AVX2 copy once, when the CPU has it.
// The library itself stays portable: only these functions use AVX2 instructions.
#include <cstdlib>
#include <string>

#include "loops.h"

namespace normfold {
namespace {

template <class A>
constexpr Loops<A> kBaseline{.moments = simd::moments<A>,
                             .sum_squares = simd::sum_squares<A>,
                             .affine = simd::affine<A>,
                             .scale_shift = simd::scale_shift<A>,
                             .add = simd::add<A>,
                             .add_centred = simd::add_centred<A>,
                             .normalize = simd::normalize<A>};

#if defined(__x86_64__) && defined(__GNUC__)
#define AVX2 __attribute__((target("avx2,fma")))
// Each wrapper inlines the simd:: template, which is then vectorised for AVX2.
template <class A>
struct Avx2 {
  AVX2 static Moments moments(const A* x, int64_t n) { return simd::moments(x, n); }
  AVX2 static double sum_squares(const A* x, int64_t n) { return simd::sum_squares(x, n); }
  AVX2 static void affine(const A* in, A* out, int64_t n, A shift, A a, A b, Activation act, A tau) {
    simd::affine(in, out, n, shift, a, b, act, tau);
  }
  AVX2 static void scale_shift(const A* in, A* out, int64_t n, A shift, A r, A offset, const A* g, const A* b) {
    simd::scale_shift(in, out, n, shift, r, offset, g, b);
  }
  AVX2 static void add(A* sum, const A* row, int64_t n) { simd::add(sum, row, n); }
  AVX2 static void add_centred(A* dsum, A* sq, const A* row, const A* shift, int64_t n) {
    simd::add_centred(dsum, sq, row, shift, n);
  }
  AVX2 static void normalize(const A* in, A* out, int64_t n, const A* shift, const A* rstd, const A* offset, A g, A b) {
    simd::normalize(in, out, n, shift, rstd, offset, g, b);
  }
  static constexpr Loops<A> table{.moments = moments,
                                  .sum_squares = sum_squares,
                                  .affine = affine,
                                  .scale_shift = scale_shift,
                                  .add = add,
                                  .add_centred = add_centred,
                                  .normalize = normalize};
};

bool has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
#endif

template <class A>
const Loops<A>& pick() {
#if defined(__x86_64__) && defined(__GNUC__)
  const char* off = std::getenv("NORMFOLD_NO_AVX2");  // set (not "0"): baseline loops, to compare or to rule AVX2 out
  static const bool avx2 = has_avx2() && !(off && *off && std::string(off) != "0");
  if (avx2) return Avx2<A>::table;
#endif
  return kBaseline<A>;
}

}  // namespace

template <class A>
const Loops<A>& loops() {
  static const Loops<A>& chosen = pick<A>();
  return chosen;
}
template const Loops<float>& loops();
template const Loops<double>& loops();

}  // namespace normfold

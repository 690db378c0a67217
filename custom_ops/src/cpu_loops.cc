// The hot loops of loops.h (namespace simd) compiled for baseline x86-64 and, on x86-64, once
// more for AVX2 + FMA and once for AVX-512; loops<A>() picks, once, the widest copy the CPU has.
// The library itself stays portable: only these functions use AVX2 / AVX-512 instructions.
#include <cstdlib>
#include <string>

#include "loops.h"

namespace normfold {
namespace {

template <class A>
constexpr Loops<A> kBaseline{.moments = simd::moments<A>,
                             .sum_squares = simd::sum_squares<A>,
                             .affine = simd::affine<A, false>,
                             .scale_shift = simd::scale_shift<A>,
                             .add_moments = simd::add_moments<A>,
                             .normalize = simd::normalize<A>,
                             .add = simd::add<A>};

#if defined(__x86_64__) && defined(__GNUC__)
// One wrapper struct per instruction set: each function inlines the simd:: template, which is then
// vectorised for that target. With -ffp-contract=off and sums in fixed lanes the copies give the same
// bits, but for the SiLU, whose multiply-adds are fused in these copies (not in the baseline one).
#define NORMFOLD_ISA_LOOPS(Name, TARGET)                                                                    \
  template <class A>                                                                                        \
  struct Name {                                                                                             \
    TARGET static Moments moments(const A* x, int64_t n) { return simd::moments(x, n); }                    \
    TARGET static double sum_squares(const A* x, int64_t n) { return simd::sum_squares(x, n); }             \
    TARGET static void affine(const A* in, A* out, int64_t n, A shift, A a, A b, Activation act, A tau) {   \
      simd::affine<A, true>(in, out, n, shift, a, b, act, tau);                                             \
    }                                                                                                       \
    TARGET static void scale_shift(const A* in, A* out, int64_t n, A shift, A r, A offset, const A* g,      \
                                   const A* b) {                                                            \
      simd::scale_shift(in, out, n, shift, r, offset, g, b);                                                \
    }                                                                                                       \
    TARGET static void add_moments(double* dsum, double* sq, const A* const* rows, int count, const A* shift, \
                                   int64_t n) {                                                             \
      simd::add_moments(dsum, sq, rows, count, shift, n);                                                   \
    }                                                                                                       \
    TARGET static void normalize(const A* in, A* out, int64_t n, const A* shift, const A* rstd,             \
                                 const A* offset, A g, A b) {                                               \
      simd::normalize(in, out, n, shift, rstd, offset, g, b);                                               \
    }                                                                                                       \
    TARGET static void add(const A* a, const A* b, A* out, int64_t n) { simd::add(a, b, out, n); }          \
    static constexpr Loops<A> table{.moments = moments,                                                     \
                                    .sum_squares = sum_squares,                                             \
                                    .affine = affine,                                                       \
                                    .scale_shift = scale_shift,                                             \
                                    .add_moments = add_moments,                                             \
                                    .normalize = normalize,                                                 \
                                    .add = add};                                                            \
  };
NORMFOLD_ISA_LOOPS(Avx2, __attribute__((target("avx2,fma"))))
NORMFOLD_ISA_LOOPS(Avx512, __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,prefer-vector-width=512"))))

enum class Isa { kBaseline, kAvx2, kAvx512 };

/// The widest instruction set the CPU has, capped by NORMFOLD_LOOPS=baseline|avx2 (to compare, or to rule one out);
/// decided once per process, so every loop table and NormfoldCpuLoops() agree.
Isa chosen_isa() {
  static const Isa chosen = [] {
    __builtin_cpu_init();
    Isa isa = Isa::kBaseline;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) isa = Isa::kAvx2;
    if (isa == Isa::kAvx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
      isa = Isa::kAvx512;
    const char* cap = std::getenv("NORMFOLD_LOOPS");
    const std::string want = cap ? cap : "";
    if (want == "baseline") return Isa::kBaseline;
    if (want == "avx2") return std::min(isa, Isa::kAvx2);
    return isa;
  }();
  return chosen;
}
#else
enum class Isa { kBaseline };
Isa chosen_isa() { return Isa::kBaseline; }
#endif

template <class A>
const Loops<A>& pick() {
#if defined(__x86_64__) && defined(__GNUC__)
  switch (chosen_isa()) {
    case Isa::kAvx512: return Avx512<A>::table;
    case Isa::kAvx2: return Avx2<A>::table;
    case Isa::kBaseline: break;
  }
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

/// The loops this process runs ("avx512", "avx2" or "baseline"), for `normfold doctor` and the benchmarks.
extern "C" __attribute__((visibility("default"))) const char* NormfoldCpuLoops() {
  switch (normfold::chosen_isa()) {
#if defined(__x86_64__) && defined(__GNUC__)
    case normfold::Isa::kAvx512: return "avx512";
    case normfold::Isa::kAvx2: return "avx2";
#endif
    case normfold::Isa::kBaseline: break;
  }
  return "baseline";
}

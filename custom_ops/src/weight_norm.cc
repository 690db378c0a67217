// WeightNorm(V, g) -> W: torch weight normalization, w = g * v / ||v||, the 2-norm over every axis
// of V but `dim`. Attribute: dim = 0 (0 <= dim < rank). g has V.shape[dim] elements (any shape,
// e.g. [O, 1, 1, 1]).
#include <cmath>

#include "loops.h"
#include "ort_glue.h"
#include "parallel.h"

namespace normfold {
namespace {

struct WeightNormAttrs {
  static constexpr const char* kName = "WeightNorm";
  int64_t dim;

  explicit WeightNormAttrs(const Attributes& a) : dim(a.get<int64_t>("dim").value_or(0)) {
    if (dim < 0) a.fail("dim must be >= 0 (the axis that keeps its own norm), got " + std::to_string(dim));
  }

  std::string check(const InputShapes& in) const {
    const Shape& v = in[0];
    if (dim >= int64_t(v.size())) return "dim=" + std::to_string(dim) + " is out of range for V of shape " + str(v);
    return check_count("g", in[1], v[size_t(dim)]);
  }
};

template <class T, bool kCuda>
struct WeightNorm : Kernel<WeightNormAttrs> {
  using Kernel::Kernel;
  using A = Acc<T>;
  using Tensor = Ort::Custom::Tensor<T>;

  Ort::Status Compute(OrtKernelContext* ctx, const Tensor& V, const Tensor& G, Tensor& W) {
    if (auto e = check(V, G); !e.empty()) return status_of(e);
    const Shape& shape = V.Shape();
    const size_t dim = size_t(attrs.dim);
    const int64_t outer = numel(shape, 0, dim), d = shape[dim], inner = numel(shape, dim + 1);
    const T *v = V.Data(), *g = G.Data();
    T* w = W.Allocate(shape);
#ifdef NORMFOLD_WITH_CUDA
    if constexpr (kCuda) {
      return status_of(cuda::weight_norm(v, g, w, outer, d, inner, cuda_dtype<T>(), cuda_stream(ctx)));
    }
#endif
    auto factor_of = [&](int64_t j, const Moments& m) { return A(to_acc(g[j]) / std::sqrt(m.m2)); };
    if (outer == 1) {  // dim = 0 (or leading 1s): each v_j is one contiguous row, normalized while it is in cache
      for_instances(
          ctx, d, inner, [&](int64_t j, int64_t lo, int64_t hi) { return squares(v + j * inner + lo, hi - lo); },
          [&](int64_t j, int64_t lo, int64_t hi, const Moments& m) {
            affine(v + j * inner + lo, w + j * inner + lo, hi - lo, A(0), factor_of(j, m), A(0));
          });
      return Ort::Status{nullptr};
    }
    std::vector<A> factor(static_cast<size_t>(d));  // g_j / ||v_j||
    parallel_for(ctx, d, [&](int64_t j) {
      Moments m;
      for (int64_t o = 0; o < outer; ++o) m.merge(squares(v + (o * d + j) * inner, inner));
      factor[size_t(j)] = factor_of(j, m);
    });
    const int64_t rows = outer * d, per_task = std::max<int64_t>(1, kTaskElems / std::max<int64_t>(inner, 1));
    parallel_for(ctx, (rows + per_task - 1) / per_task, [&](int64_t t) {
      for (int64_t r = t * per_task; r < std::min(rows, (t + 1) * per_task); ++r)
        affine(v + r * inner, w + r * inner, inner, A(0), factor[size_t(r % d)], A(0));
    });
    return Ort::Status{nullptr};
  }
};

}  // namespace

void add_weight_norm(OpList& ops) { add_kernels<WeightNorm>(ops); }

}  // namespace normfold

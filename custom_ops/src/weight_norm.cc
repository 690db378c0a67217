// WeightNorm(V, g) -> W: torch weight normalization, w = g * v / ||v||, the 2-norm over every axis
// of V but `dim`. Attribute: dim = 0 (0 <= dim < rank). g has V.shape[dim] elements (any shape,
// e.g. [O, 1, 1, 1]).
#include "norm_common.h"

namespace normfold {
namespace {

struct WeightNormAttrs {
  int64_t dim;

  explicit WeightNormAttrs(const OrtKernelInfo* info) : dim(attribute<int64_t>(info, "WeightNorm", "dim").value_or(0)) {
    if (dim < 0) fail("WeightNorm: dim must be >= 0 (the axis that keeps its own norm), got " + std::to_string(dim));
  }

  /// "" or why these input shapes do not fit (unknown dims are not checked).
  std::string check(const Shape& v, const Shape& g) const {
    if (dim >= int64_t(v.size())) return "WeightNorm: dim=" + std::to_string(dim) + " is out of range for V of shape " + str(v);
    return check_count("WeightNorm", "g", g, v[size_t(dim)]);
  }
};

template <class T, bool kCuda>
struct WeightNorm {
  using A = Acc<T>;
  using Tensor = Ort::Custom::Tensor<T>;
  WeightNormAttrs attrs;

  WeightNorm(const OrtApi*, const OrtKernelInfo* info) : attrs(info) {
    require_present_inputs(info, "WeightNorm");
    if (auto v = static_shape(info, 0)) {
      const std::string e = attrs.check(*v, static_shape(info, 1).value_or(Shape{-1}));
      if (!e.empty()) fail(e);
    }
  }

  Ort::Status Compute(OrtKernelContext* ctx, const Tensor& V, const Tensor& G, Tensor& W) {
    const Shape& shape = V.Shape();
    if (auto e = attrs.check(shape, G.Shape()); !e.empty()) return status_of(e);
    const size_t dim = size_t(attrs.dim);
    const int64_t outer = numel(shape, 0, dim), d = shape[dim], inner = numel(shape, dim + 1);
    const T *v = V.Data(), *g = G.Data();
    T* w = W.Allocate(shape);
#ifdef NORMFOLD_WITH_CUDA
    if constexpr (kCuda) {
      return status_of(cuda::weight_norm(v, g, w, outer, d, inner, cuda_dtype<T>(), cuda_stream(ctx)));
    }
#endif
    std::vector<double> factor(static_cast<size_t>(d));  // g_j / ||v_j||
    parallel_for(ctx, d, [&](int64_t j) {
      Moments m;
      for (int64_t o = 0; o < outer; ++o) m.merge(squares(v + (o * d + j) * inner, inner));
      factor[size_t(j)] = to_acc(g[j]) / std::sqrt(m.m2);
    });
    const int64_t rows = outer * d, per_task = std::max<int64_t>(1, kTaskElems / std::max<int64_t>(inner, 1));
    parallel_for(ctx, (rows + per_task - 1) / per_task, [&](int64_t t) {
      for (int64_t r = t * per_task; r < std::min(rows, (t + 1) * per_task); ++r)
        affine(v + r * inner, w + r * inner, inner, A(0), A(factor[size_t(r % d)]), A(0));
    });
    return Ort::Status{nullptr};
  }
};

}  // namespace

void add_weight_norm(OpList& ops) { add_kernels<WeightNorm>(ops, "WeightNorm"); }

}  // namespace normfold

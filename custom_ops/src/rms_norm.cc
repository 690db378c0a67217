// RMSNorm(X, scale?) -> Y: torch.nn.RMSNorm / F.rms_norm, y = x / sqrt(mean(x²) + epsilon) * scale over
// axes [axis, rank). Attributes: axis = -1; epsilon, default like torch's eps=None: the machine epsilon
// of X's dtype (normfold's fuse pass always sets it). scale has prod(X.shape[axis:]) elements.
#include <limits>

#include "norm_common.h"

namespace normfold {
namespace {

struct RMSNormAttrs {
  int64_t axis;
  std::optional<float> epsilon;

  explicit RMSNormAttrs(const OrtKernelInfo* info)
      : axis(attribute<int64_t>(info, "RMSNorm", "axis").value_or(-1)), epsilon(attribute<float>(info, "RMSNorm", "epsilon")) {
    if (epsilon && *epsilon < 0) fail("RMSNorm: epsilon must be >= 0");
  }

  int64_t first_axis(size_t rank) const {
    const int64_t a = axis < 0 ? axis + int64_t(rank) : axis;
    return a >= 0 && a < int64_t(rank) ? a : -1;
  }

  /// "" or why these input shapes do not fit (unknown dims are not checked).
  std::string check(const Shape& x, const std::optional<Shape>& scale) const {
    if (first_axis(x.size()) < 0) return "RMSNorm: axis=" + std::to_string(axis) + " is out of range for X of shape " + str(x);
    return scale ? check_count("RMSNorm", "scale", *scale, numel(x, size_t(first_axis(x.size())))) : "";
  }
};

/// torch.finfo(dtype).eps, the default epsilon of torch.nn.RMSNorm.
template <class T>
double machine_epsilon() {
  if constexpr (std::is_same_v<T, Ort::Float16_t>) return 0.0009765625;  // 2^-10
  else if constexpr (std::is_same_v<T, Ort::BFloat16_t>) return 0.0078125;  // 2^-7
  else return std::numeric_limits<T>::epsilon();
}

template <class T, bool kCuda>
struct RMSNorm {
  using A = Acc<T>;
  using Tensor = Ort::Custom::Tensor<T>;
  RMSNormAttrs attrs;

  RMSNorm(const OrtApi*, const OrtKernelInfo* info) : attrs(info) {
    require_present_inputs(info, "RMSNorm");
    if (auto x = static_shape(info, 0)) {
      const std::string e = attrs.check(*x, static_shape(info, 1));
      if (!e.empty()) fail(e);
    }
  }

  Ort::Status Compute(OrtKernelContext* ctx, const Tensor& X, std::optional<const Tensor*> scale, Tensor& Y) {
    const Shape& shape = X.Shape();
    std::optional<Shape> scale_shape;
    if (scale) scale_shape = (*scale)->Shape();
    if (auto e = attrs.check(shape, scale_shape); !e.empty()) return status_of(e);
    const int64_t d = numel(shape, size_t(attrs.first_axis(shape.size())));
    const double epsilon = attrs.epsilon ? double(*attrs.epsilon) : machine_epsilon<T>();
#ifdef NORMFOLD_WITH_CUDA
    if constexpr (kCuda) {
      const cuda::RowNorm p{X.Data(), scale ? (*scale)->Data() : nullptr, nullptr, nullptr, Y.Allocate(shape),
                            d ? numel(shape) / d : 0, d, 1, 1, float(epsilon), false, 0};
      return status_of(cuda::row_norm(p, cuda_dtype<T>(), cuda_stream(ctx)));
    }
#endif
    std::vector<A> gamma_values;  // converted copy (fp16/bf16), or ones without scale
    if (!scale) gamma_values.assign(size_t(d), A(1));
    const A* gamma = scale ? acc_values((*scale)->Data(), d, gamma_values) : gamma_values.data();
    const T* x = X.Data();
    T* y = Y.Allocate(shape);
    for_instances(
        ctx, d ? numel(shape) / d : 0, d, [&](int64_t i, int64_t lo, int64_t hi) { return squares(x + i * d + lo, hi - lo); },
        [&](int64_t i, int64_t lo, int64_t hi, const Moments& m) {
          const A r = A(1.0 / std::sqrt(m.m2 / m.n + epsilon));
          map_blocks(x + i * d + lo, y + i * d + lo, hi - lo, [&](const A* in, A* out, int64_t len, int64_t off) {
            loops<A>().scale_shift(in, out, len, A(0), r, A(0), gamma + lo + off, nullptr);
          });
        });
    return Ort::Status{nullptr};
  }
};

}  // namespace

void add_rms_norm(OpList& ops) { add_kernels<RMSNorm>(ops, "RMSNorm"); }

}  // namespace normfold

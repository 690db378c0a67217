// RMSNorm(X, scale?) -> Y: torch.nn.RMSNorm / F.rms_norm, y = x / sqrt(mean(x²) + epsilon) * scale over
// axes [axis, rank). Attributes: axis = -1; epsilon, default like torch's eps=None: the machine epsilon
// of X's dtype (normfold's fuse pass always sets it). scale has prod(X.shape[axis:]) elements.
#include <limits>

#include <cmath>

#include "loops.h"
#include "ort_glue.h"
#include "parallel.h"

namespace normfold {
namespace {

struct RMSNormAttrs {
  static constexpr const char* kName = "RMSNorm";
  int64_t axis;
  std::optional<float> epsilon;

  explicit RMSNormAttrs(const Attributes& a)
      : axis(a.get<int64_t>("axis").value_or(-1)), epsilon(a.get<float>("epsilon")) {
    if (epsilon && *epsilon < 0) a.fail("epsilon must be >= 0");
  }

  std::string check(const InputShapes& in) const {
    const Shape& x = in[0];
    const int64_t first = normalized_axis(axis, x.size());
    if (first < 0) return "axis=" + std::to_string(axis) + " is out of range for X of shape " + str(x);
    const Shape* scale = in.optional(1);
    return scale ? check_count("scale", *scale, numel(x, size_t(first))) : "";
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
struct RMSNorm : Kernel<RMSNormAttrs> {
  using Kernel::Kernel;
  using A = Acc<T>;
  using Tensor = Ort::Custom::Tensor<T>;

  Ort::Status Compute(OrtKernelContext* ctx, const Tensor& X, std::optional<const Tensor*> scale, Tensor& Y) {
    if (auto e = check(X, scale); !e.empty()) return status_of(e);
    const Shape& shape = X.Shape();
    const int64_t d = numel(shape, size_t(normalized_axis(attrs.axis, shape.size())));
    const double epsilon = attrs.epsilon ? double(*attrs.epsilon) : machine_epsilon<T>();
#ifdef NORMFOLD_WITH_CUDA
    if constexpr (kCuda) {
      const cuda::RowNorm p{.x = X.Data(), .gamma = scale ? (*scale)->Data() : nullptr, .y = Y.Allocate(shape),
                            .count = d ? numel(shape) / d : 0, .size = d, .epsilon = float(epsilon), .centered = false};
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

void add_rms_norm(OpList& ops) { add_kernels<RMSNorm>(ops); }

}  // namespace normfold

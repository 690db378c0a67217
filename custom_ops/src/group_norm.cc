// GroupNorm(X, scale, bias) -> Y: torch.nn.GroupNorm over X = N x C x spatial (any spatial rank),
// with an optional fused SiLU. Attributes: num_groups (required), epsilon = 1e-5, activation = "none"|"silu".
#include "norm_common.h"

namespace normfold {
namespace {

struct GroupNormAttrs {
  int64_t groups;
  float epsilon;
  bool silu;

  explicit GroupNormAttrs(const OrtKernelInfo* info)
      : groups(attribute<int64_t>(info, "GroupNorm", "num_groups").value_or(0)),
        epsilon(attribute<float>(info, "GroupNorm", "epsilon").value_or(1e-5f)) {
    const std::string activation = attribute<std::string>(info, "GroupNorm", "activation").value_or("none");
    if (groups <= 0) fail("GroupNorm: attribute num_groups must be set to a positive integer");
    if (epsilon < 0) fail("GroupNorm: epsilon must be >= 0");
    if (activation != "none" && activation != "silu")
      fail("GroupNorm: activation must be 'none' or 'silu', got '" + activation + "'");
    silu = activation == "silu";
  }

  /// "" or why these input shapes do not fit (unknown dims are not checked).
  std::string check(const Shape& x, const Shape& scale, const Shape& bias) const {
    if (x.size() < 2) return "GroupNorm: X must be N x C x ... (rank >= 2), got shape " + str(x);
    if (x[1] >= 0 && x[1] % groups)
      return "GroupNorm: C=" + std::to_string(x[1]) + " is not divisible by num_groups=" + std::to_string(groups);
    const std::string e = check_count("GroupNorm", "scale", scale, x[1]);
    return e.empty() ? check_count("GroupNorm", "bias", bias, x[1]) : e;
  }
};

template <class T, bool kCuda>
struct GroupNorm {
  using A = Acc<T>;
  GroupNormAttrs attrs;

  GroupNorm(const OrtApi*, const OrtKernelInfo* info) : attrs(info) {
    require_present_inputs(info, "GroupNorm");
    if (auto x = static_shape(info, 0)) {
      const std::string e = attrs.check(*x, static_shape(info, 1).value_or(Shape{-1}), static_shape(info, 2).value_or(Shape{-1}));
      if (!e.empty()) fail(e);
    }
  }

  Ort::Status Compute(OrtKernelContext* ctx, const Ort::Custom::Tensor<T>& X, const Ort::Custom::Tensor<T>& scale,
                      const Ort::Custom::Tensor<T>& bias, Ort::Custom::Tensor<T>& Y) {
    const Shape& shape = X.Shape();
    if (auto e = attrs.check(shape, scale.Shape(), bias.Shape()); !e.empty()) return status_of(e);
    T* y = Y.Allocate(shape);
    const T *x = X.Data(), *gamma = scale.Data(), *beta = bias.Data();
    const int64_t spatial = numel(shape, 2), per_group = shape[1] / attrs.groups, size = per_group * spatial;
#ifdef NORMFOLD_WITH_CUDA
    if constexpr (kCuda) {
      const cuda::RowNorm p{x, gamma, beta, nullptr, y, shape[0] * attrs.groups, size, spatial, attrs.groups,
                            attrs.epsilon, true, attrs.silu ? 1 : 0};
      return status_of(cuda::row_norm(p, cuda_dtype<T>(), cuda_stream(ctx)));
    }
#endif
    for_instances(
        ctx, shape[0] * attrs.groups, size,
        [&](int64_t i, int64_t lo, int64_t hi) { return moments(x + i * size + lo, hi - lo); },
        [&](int64_t i, int64_t lo, int64_t hi, const Moments& m) {
          const double rstd = 1.0 / std::sqrt(m.variance() + attrs.epsilon);
          const SplitMean<A> mean(m.mean);
          const int64_t first_channel = (i % attrs.groups) * per_group;
          for (int64_t pos = lo; pos < hi;) {  // one channel (one scale/shift) at a time
            const int64_t c = pos / spatial, end = std::min(hi, (c + 1) * spatial);
            const double a = rstd * to_acc(gamma[first_channel + c]);
            const A b = A(to_acc(beta[first_channel + c]) - mean.lo * a);
            const T* src = x + i * size + pos;
            T* dst = y + i * size + pos;
            affine(src, dst, end - pos, mean.hi, A(a), b, attrs.silu ? Act::kSilu : Act::kNone);
            pos = end;
          }
        });
    return Ort::Status{nullptr};
  }
};

}  // namespace

void add_group_norm(OpList& ops) { add_kernels<GroupNorm>(ops, "GroupNorm"); }

}  // namespace normfold

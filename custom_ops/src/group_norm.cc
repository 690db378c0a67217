// GroupNorm(X, scale, bias) -> Y: torch.nn.GroupNorm over X = N x C x spatial (any spatial rank),
// with an optional fused SiLU. Attributes: num_groups (required), epsilon = 1e-5, activation = "none"|"silu".
#include <cmath>

#include "group_norm_attrs.h"
#include "loops.h"
#include "ort_glue.h"
#include "parallel.h"

namespace normfold {
namespace {

struct GroupNormAttrs : GroupNormSettings {
  static constexpr const char* kName = "GroupNorm";
  using GroupNormSettings::GroupNormSettings;

  std::string check(const InputShapes& in) const {
    std::string e = check_x(in[0]);
    if (e.empty()) e = check_count("scale", in[1], in[0][1]);
    return e.empty() ? check_count("bias", in[2], in[0][1]) : e;
  }
};

template <class T, bool kCuda>
struct GroupNorm : Kernel<GroupNormAttrs> {
  using Kernel::Kernel;
  using A = Acc<T>;
  using Tensor = Ort::Custom::Tensor<T>;

  Ort::Status Compute(OrtKernelContext* ctx, const Tensor& X, const Tensor& scale, const Tensor& bias, Tensor& Y) {
    if (auto e = check(X, scale, bias); !e.empty()) return status_of(e);
    const Shape& shape = X.Shape();
    T* y = Y.Allocate(shape);
    const T *x = X.Data(), *gamma = scale.Data(), *beta = bias.Data();
    const int64_t spatial = numel(shape, 2), per_group = shape[1] / attrs.groups, size = per_group * spatial;
#ifdef NORMFOLD_WITH_CUDA
    if constexpr (kCuda) {
      const cuda::RowNorm p{.x = x, .gamma = gamma, .beta = beta, .y = y, .count = shape[0] * attrs.groups, .size = size,
                            .spatial = spatial, .period = attrs.groups, .epsilon = attrs.epsilon, .centered = true,
                            .activation = attrs.activation};
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
            affine(x + i * size + pos, y + i * size + pos, end - pos, mean.hi, A(a), b, attrs.activation);
            pos = end;
          }
        });
    return Ort::Status{nullptr};
  }
};

}  // namespace

void add_group_norm(OpList& ops) { add_kernels<GroupNorm>(ops); }

}  // namespace normfold

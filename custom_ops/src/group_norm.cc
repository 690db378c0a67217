// GroupNorm(X, scale, bias) -> Y: torch.nn.GroupNorm over X = N x C x spatial (any spatial rank),
// with an optional fused SiLU. Attributes: num_groups (required), epsilon = 1e-5, activation = "none"|"silu".
#include <cmath>

#include "loops.h"
#include "ort_glue.h"
#include "parallel.h"

namespace normfold {
namespace {

struct GroupNormAttrs {
  static constexpr const char* kName = "GroupNorm";
  int64_t groups;
  float epsilon;
  Activation activation = Activation::kNone;

  explicit GroupNormAttrs(const Attributes& a)
      : groups(a.get<int64_t>("num_groups").value_or(0)), epsilon(a.get<float>("epsilon").value_or(1e-5f)) {
    const std::string act = a.get<std::string>("activation").value_or("none");
    if (groups <= 0) a.fail("attribute num_groups must be set to a positive integer");
    if (epsilon < 0) a.fail("epsilon must be >= 0");
    if (act != "none" && act != "silu") a.fail("activation must be 'none' or 'silu', got '" + act + "'");
    if (act == "silu") activation = Activation::kSilu;
  }

  std::string check(const InputShapes& in) const {
    const Shape& x = in[0];
    if (x.size() < 2) return "X must be N x C x ... (rank >= 2), got shape " + str(x);
    if (x[1] >= 0 && x[1] % groups)
      return "C=" + std::to_string(x[1]) + " is not divisible by num_groups=" + std::to_string(groups);
    const std::string e = check_count("scale", in[1], x[1]);
    return e.empty() ? check_count("bias", in[2], x[1]) : e;
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

// BiasGroupNorm(X, add, scale, bias) -> Y = GroupNorm(X + add[n, c]) (+SiLU): a per-sample, per-channel
// add fused into the GroupNorm that reads it (the time-embedding add before the second norm of a
// diffusion ResNet block). X is N x C x spatial; add has N·C elements (e.g. [N, C, 1, 1]); scale and
// bias have C. Attributes as GroupNorm: num_groups (required), epsilon = 1e-5, activation = "none"|"silu".
//
// X + add is never written: the statistics pass takes each channel's moments of X and shifts their
// mean by the channel's add (the squared deviations do not change), then merges them (Chan); the
// write pass folds the add into each channel's shift. CUDA: the row kernel of cuda_kernels.h with `add`.
#include <cmath>

#include "group_norm_attrs.h"
#include "loops.h"
#include "ort_glue.h"
#include "parallel.h"

namespace normfold {
namespace {

struct BiasGroupNormAttrs : GroupNormSettings {
  static constexpr const char* kName = "BiasGroupNorm";
  using GroupNormSettings::GroupNormSettings;

  std::string check(const InputShapes& in) const {
    const Shape& x = in[0];
    std::string e = check_x(x);
    const int64_t nc = x.size() >= 2 && x[0] >= 0 && x[1] >= 0 ? x[0] * x[1] : -1;
    if (e.empty()) e = check_count("add", in[1], nc);
    if (e.empty()) e = check_count("scale", in[2], x[1]);
    return e.empty() ? check_count("bias", in[3], x[1]) : e;
  }
};

template <class T, bool kCuda>
struct BiasGroupNorm : Kernel<BiasGroupNormAttrs> {
  using Kernel::Kernel;
  using A = Acc<T>;
  using Tensor = Ort::Custom::Tensor<T>;

  Ort::Status Compute(OrtKernelContext* ctx, const Tensor& X, const Tensor& add, const Tensor& scale,
                      const Tensor& bias, Tensor& Y) {
    if (auto e = check(X, add, scale, bias); !e.empty()) return status_of(e);
    const Shape& shape = X.Shape();
    T* y = Y.Allocate(shape);
    const T *x = X.Data(), *t = add.Data(), *gamma = scale.Data(), *beta = bias.Data();
    const int64_t channels = shape[1], spatial = numel(shape, 2), per_group = channels / attrs.groups;
    const int64_t size = per_group * spatial;
#ifdef NORMFOLD_WITH_CUDA
    if constexpr (kCuda) {
      const cuda::RowNorm p{.x = x, .add = t, .gamma = gamma, .beta = beta, .y = y, .count = shape[0] * attrs.groups,
                            .size = size, .spatial = spatial, .period = attrs.groups, .epsilon = attrs.epsilon,
                            .centered = true, .activation = attrs.activation};
      return status_of(cuda::row_norm(p, cuda_dtype<T>(), cuda_stream(ctx)));
    }
#endif
    // calls f(channel index in the group, position range [pos, end)) for each channel piece of [lo, hi)
    auto channel_pieces = [&](int64_t lo, int64_t hi, auto&& f) {
      for (int64_t pos = lo; pos < hi;) {
        const int64_t c = pos / spatial, end = std::min(hi, (c + 1) * spatial);
        f(c, pos, end);
        pos = end;
      }
    };
    // group i is sample i / groups; its channel c (in the group) is n·C + first + c of `add`
    auto add_of = [&](int64_t i, int64_t c) {
      return double(to_acc(t[(i / attrs.groups) * channels + (i % attrs.groups) * per_group + c]));
    };
    for_instances(
        ctx, shape[0] * attrs.groups, size,
        [&](int64_t i, int64_t lo, int64_t hi) {
          Moments group;
          channel_pieces(lo, hi, [&](int64_t c, int64_t pos, int64_t end) {
            Moments m = moments(x + i * size + pos, end - pos);
            m.mean += add_of(i, c);
            group.merge(m);
          });
          return group;
        },
        [&](int64_t i, int64_t lo, int64_t hi, const Moments& m) {
          const double rstd = 1.0 / std::sqrt(m.variance() + attrs.epsilon);
          const int64_t first_channel = (i % attrs.groups) * per_group;
          channel_pieces(lo, hi, [&](int64_t c, int64_t pos, int64_t end) {
            const SplitMean<A> shift(m.mean - add_of(i, c));  // (x + add - mean) = (x - shift)
            const double a = rstd * to_acc(gamma[first_channel + c]);
            const A b = A(to_acc(beta[first_channel + c]) - shift.lo * a);
            affine(x + i * size + pos, y + i * size + pos, end - pos, shift.hi, A(a), b, attrs.activation);
          });
        });
    return Ort::Status{nullptr};
  }
};

}  // namespace

void add_bias_group_norm(OpList& ops) { add_kernels<BiasGroupNorm>(ops); }

}  // namespace normfold

// FilterResponseNorm(X, gamma, beta, tau?) -> Y (Singh & Krishnan 2019) over X = N x C x spatial:
// nu2 = mean(x²) over spatial per (n, c); y = gamma * x / sqrt(nu2 + |epsilon|) + beta; with TLU
// z = max(y, tau). Attributes: epsilon = 1e-6, use_tlu = 1 (then tau is required). gamma, beta and
// tau have C elements (any shape, e.g. [1, C, 1, 1]).
#include "norm_common.h"

namespace normfold {
namespace {

struct FRNAttrs {
  float epsilon;
  bool use_tlu;

  explicit FRNAttrs(const OrtKernelInfo* info)
      : epsilon(std::fabs(attribute<float>(info, "FilterResponseNorm", "epsilon").value_or(1e-6f))),
        use_tlu(attribute<int64_t>(info, "FilterResponseNorm", "use_tlu").value_or(1) != 0) {}

  /// "" or why these input shapes do not fit (unknown dims are not checked).
  std::string check(const Shape& x, const Shape& gamma, const Shape& beta, const std::optional<Shape>& tau) const {
    if (x.size() < 2) return "FilterResponseNorm: X must be N x C x ... (rank >= 2), got shape " + str(x);
    if (use_tlu && !tau) return "FilterResponseNorm: use_tlu=1 needs the tau input";
    std::string e = check_count("FilterResponseNorm", "gamma", gamma, x[1]);
    if (e.empty()) e = check_count("FilterResponseNorm", "beta", beta, x[1]);
    if (e.empty() && tau) e = check_count("FilterResponseNorm", "tau", *tau, x[1]);
    return e;
  }
};

template <class T, bool kCuda>
struct FilterResponseNorm {
  using A = Acc<T>;
  using Tensor = Ort::Custom::Tensor<T>;
  FRNAttrs attrs;

  FilterResponseNorm(const OrtApi*, const OrtKernelInfo* info) : attrs(info) {
    require_present_inputs(info, "FilterResponseNorm");
    if (auto x = static_shape(info, 0)) {
      const bool has_tau = Ort::ConstKernelInfo(info).GetInputCount() > 3;
      const std::string e = attrs.check(*x, static_shape(info, 1).value_or(Shape{-1}), static_shape(info, 2).value_or(Shape{-1}),
                                        has_tau ? std::optional<Shape>(static_shape(info, 3).value_or(Shape{-1})) : std::nullopt);
      if (!e.empty()) fail(e);
    }
  }

  Ort::Status Compute(OrtKernelContext* ctx, const Tensor& X, const Tensor& gamma, const Tensor& beta,
                      std::optional<const Tensor*> tau, Tensor& Y) {
    const Shape& shape = X.Shape();
    std::optional<Shape> tau_shape;
    if (tau) tau_shape = (*tau)->Shape();
    if (auto e = attrs.check(shape, gamma.Shape(), beta.Shape(), tau_shape); !e.empty()) return status_of(e);
    const T *x = X.Data(), *g = gamma.Data(), *b = beta.Data();
    const T* t = tau ? (*tau)->Data() : nullptr;
    T* y = Y.Allocate(shape);
    const int64_t channels = shape[1], spatial = numel(shape, 2);
#ifdef NORMFOLD_WITH_CUDA
    if constexpr (kCuda) {
      const cuda::RowNorm p{x, g, b, t, y, shape[0] * channels, spatial, spatial, channels, attrs.epsilon, false,
                            attrs.use_tlu ? 2 : 0};
      return status_of(cuda::row_norm(p, cuda_dtype<T>(), cuda_stream(ctx)));
    }
#endif
    for_instances(
        ctx, shape[0] * channels, spatial, [&](int64_t i, int64_t lo, int64_t hi) { return squares(x + i * spatial + lo, hi - lo); },
        [&](int64_t i, int64_t lo, int64_t hi, const Moments& m) {
          const int64_t c = i % channels;
          const A a = A(to_acc(g[c]) / std::sqrt(m.m2 / m.n + attrs.epsilon)), shift = to_acc(b[c]);
          affine(x + i * spatial + lo, y + i * spatial + lo, hi - lo, A(0), a, shift, attrs.use_tlu ? Act::kTlu : Act::kNone,
                 attrs.use_tlu ? to_acc(t[c]) : A(0));
        });
    return Ort::Status{nullptr};
  }
};

}  // namespace

void add_filter_response_norm(OpList& ops) { add_kernels<FilterResponseNorm>(ops, "FilterResponseNorm"); }

}  // namespace normfold

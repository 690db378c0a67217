// FilterResponseNorm(X, gamma, beta, tau?) -> Y (Singh & Krishnan 2019) over X = N x C x spatial:
// nu2 = mean(x²) over spatial per (n, c); y = gamma * x / sqrt(nu2 + |epsilon|) + beta; with TLU
// z = max(y, tau). Attributes: epsilon = 1e-6, use_tlu = 1 (then tau is required). gamma, beta and
// tau have C elements (any shape, e.g. [1, C, 1, 1]).
#include <cmath>

#include "loops.h"
#include "ort_glue.h"
#include "parallel.h"

namespace normfold {
namespace {

struct FRNAttrs {
  static constexpr const char* kName = "FilterResponseNorm";
  float epsilon;
  bool use_tlu;

  explicit FRNAttrs(const Attributes& a)
      : epsilon(std::fabs(a.get<float>("epsilon").value_or(1e-6f))),
        use_tlu(a.get<int64_t>("use_tlu").value_or(1) != 0) {}

  std::string check(const InputShapes& in) const {
    const Shape& x = in[0];
    const Shape* tau = in.optional(3);
    if (x.size() < 2) return "X must be N x C x ... (rank >= 2), got shape " + str(x);
    if (use_tlu && !tau) return "use_tlu=1 needs the tau input";
    std::string e = check_count("gamma", in[1], x[1]);
    if (e.empty()) e = check_count("beta", in[2], x[1]);
    if (e.empty() && tau) e = check_count("tau", *tau, x[1]);
    return e;
  }
};

template <class T, bool kCuda>
struct FilterResponseNorm : Kernel<FRNAttrs> {
  using Kernel::Kernel;
  using A = Acc<T>;
  using Tensor = Ort::Custom::Tensor<T>;

  Ort::Status Compute(OrtKernelContext* ctx, const Tensor& X, const Tensor& gamma, const Tensor& beta,
                      std::optional<const Tensor*> tau, Tensor& Y) {
    if (auto e = check(X, gamma, beta, tau); !e.empty()) return status_of(e);
    const Shape& shape = X.Shape();
    const T *x = X.Data(), *g = gamma.Data(), *b = beta.Data();
    const T* t = tau ? (*tau)->Data() : nullptr;
    T* y = Y.Allocate(shape);
    const int64_t channels = shape[1], spatial = numel(shape, 2);
#ifdef NORMFOLD_WITH_CUDA
    if constexpr (kCuda) {
      const cuda::RowNorm p{.x = x, .gamma = g, .beta = b, .tau = t, .y = y, .count = shape[0] * channels, .size = spatial,
                            .spatial = spatial, .period = channels, .epsilon = attrs.epsilon, .centered = false,
                            .activation = activation()};
      return status_of(cuda::row_norm(p, cuda_dtype<T>(), cuda_stream(ctx)));
    }
#endif
    for_instances(
        ctx, shape[0] * channels, spatial, [&](int64_t i, int64_t lo, int64_t hi) { return squares(x + i * spatial + lo, hi - lo); },
        [&](int64_t i, int64_t lo, int64_t hi, const Moments& m) {
          const int64_t c = i % channels;
          const A a = A(to_acc(g[c]) / std::sqrt(m.m2 / m.n + attrs.epsilon)), shift = to_acc(b[c]);
          affine(x + i * spatial + lo, y + i * spatial + lo, hi - lo, A(0), a, shift, activation(),
                 attrs.use_tlu ? to_acc(t[c]) : A(0));
        });
    return Ort::Status{nullptr};
  }

  Activation activation() const { return attrs.use_tlu ? Activation::kTlu : Activation::kNone; }
};

}  // namespace

void add_filter_response_norm(OpList& ops) { add_kernels<FilterResponseNorm>(ops); }

}  // namespace normfold

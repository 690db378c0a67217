// LayerNorm(X, scale, bias?) -> Y with the semantics of torch.nn.LayerNorm / F.layer_norm.
// Attributes: axis = -1, epsilon = 1e-5, channel_first = 0.
//   channel_first = 0: normalize over axes [axis, rank) (like ONNX LayerNormalization);
//                      scale/bias have prod(X.shape[axis:]) elements.
//   channel_first = 1: X is N x C x spatial; normalize over C (axis 1) alone for every (n, position),
//                      as ConvNeXt's LayerNorm2d; scale/bias have C elements. `axis`, if set, must be 1.
#include <cmath>

#include "loops.h"
#include "ort_glue.h"
#include "parallel.h"

namespace normfold {
namespace {

struct LayerNormAttrs {
  static constexpr const char* kName = "LayerNorm";
  int64_t axis;
  float epsilon;
  bool channel_first;

  explicit LayerNormAttrs(const Attributes& a)
      : axis(a.get<int64_t>("axis").value_or(-1)),
        epsilon(a.get<float>("epsilon").value_or(1e-5f)),
        channel_first(a.get<int64_t>("channel_first").value_or(0) != 0) {
    if (epsilon < 0) a.fail("epsilon must be >= 0");
    if (channel_first && a.get<int64_t>("axis").value_or(1) != 1)
      a.fail("with channel_first=1 the normalized axis is 1; axis=" + std::to_string(axis) + " contradicts it");
  }

  /// Elements each of scale and bias must have for input shape x (-1 when unknown).
  int64_t param_count(const Shape& x) const {
    return channel_first ? x[1] : numel(x, size_t(normalized_axis(axis, x.size())));
  }

  std::string check(const InputShapes& in) const {
    const Shape& x = in[0];
    if (channel_first && x.size() < 2) return "channel_first=1 needs X of rank >= 2, got shape " + str(x);
    if (!channel_first && normalized_axis(axis, x.size()) < 0)
      return "axis=" + std::to_string(axis) + " is out of range for X of shape " + str(x);
    const std::string e = check_count("scale", in[1], param_count(x));
    const Shape* bias = in.optional(2);
    return e.empty() && bias ? check_count("bias", *bias, param_count(x)) : e;
  }
};

template <class T, bool kCuda>
struct LayerNorm : Kernel<LayerNormAttrs> {
  using Kernel::Kernel;
  using A = Acc<T>;
  using Tensor = Ort::Custom::Tensor<T>;

  Ort::Status Compute(OrtKernelContext* ctx, const Tensor& X, const Tensor& scale, std::optional<const Tensor*> bias,
                      Tensor& Y) {
    if (auto e = check(X, scale, bias); !e.empty()) return status_of(e);
    const Shape& shape = X.Shape();
    const int64_t count = attrs.param_count(shape);
#ifdef NORMFOLD_WITH_CUDA
    if constexpr (kCuda) {
      const void* beta = bias ? (*bias)->Data() : nullptr;
      T* y = Y.Allocate(shape);
      if (attrs.channel_first)
        return status_of(cuda::channel_norm(X.Data(), scale.Data(), beta, y, shape[0], shape[1], numel(shape, 2),
                                            attrs.epsilon, cuda_dtype<T>(), cuda_stream(ctx)));
      const cuda::RowNorm p{.x = X.Data(), .gamma = scale.Data(), .beta = beta, .y = y,
                            .count = count ? numel(shape) / count : 0, .size = count, .epsilon = attrs.epsilon,
                            .centered = true};
      return status_of(cuda::row_norm(p, cuda_dtype<T>(), cuda_stream(ctx)));
    }
#endif
    std::vector<A> gamma_values, beta_values;  // converted copies, fp16/bf16 only
    const A* gamma = acc_values(scale.Data(), count, gamma_values);
    const A* beta = bias ? acc_values((*bias)->Data(), count, beta_values) : nullptr;
    T* y = Y.Allocate(shape);
    if (attrs.channel_first) {
      channel_first(ctx, X.Data(), y, shape[0], shape[1], numel(shape, 2), gamma, beta);
    } else {
      last_axes(ctx, X.Data(), y, numel(shape) / std::max<int64_t>(count, 1), count, gamma, beta);
    }
    return Ort::Status{nullptr};
  }

  /// Rows of d contiguous elements, each normalized on its own.
  void last_axes(OrtKernelContext* ctx, const T* x, T* y, int64_t rows, int64_t d, const A* gamma, const A* beta) {
    for_instances(
        ctx, rows, d, [&](int64_t i, int64_t lo, int64_t hi) { return moments(x + i * d + lo, hi - lo); },
        [&](int64_t i, int64_t lo, int64_t hi, const Moments& m) {
          const double rstd = 1.0 / std::sqrt(m.variance() + attrs.epsilon);
          const SplitMean<A> mean(m.mean);
          const A r = A(rstd), offset = A(-mean.lo * rstd);
          map_blocks(x + i * d + lo, y + i * d + lo, hi - lo, [&](const A* in, A* out, int64_t len, int64_t off) {
            loops<A>().scale_shift(in, out, len, mean.hi, r, offset, gamma + lo + off, beta ? beta + lo + off : nullptr);
          });
        });
  }

  /// N x C x S, statistics over C for every (n, position). A task takes a block of positions of one
  /// sample, about 256K elements, and reads it channel row by channel row twice: the statistics, then
  /// the write pass (that read hits L2/L3). Long rows (width positions, up to 16 KB) keep the first,
  /// strided read from memory streaming; short rows left it waiting on memory latency (measured 1.4x
  /// slower). The statistics are one pass: d = x - (channel 0's value at that position), Σd and Σd² in
  /// double, so a large mean (x + 1000) does not cancel the variance (the shift is a value of the data).
  void channel_first(OrtKernelContext* ctx, const T* x, T* y, int64_t n, int64_t c, int64_t s, const A* gamma,
                     const A* beta) {
    if (n <= 0 || c <= 0 || s <= 0) return;
    constexpr int64_t kMaxBlock = 4096;
    const int64_t min_blocks = (8 + n - 1) / n;  // at least 8 tasks in all, for the thread pool
    const int64_t per_block = std::min(256 * 1024 / c, (s + min_blocks - 1) / min_blocks);
    const int64_t width = std::min(std::clamp<int64_t>((per_block + 15) / 16 * 16, 16, kMaxBlock), s);
    const int64_t blocks = (s + width - 1) / width;
    parallel_for(ctx, n * blocks, [&](int64_t t) {
      const int64_t start = (t % blocks) * width, len = std::min(width, s - start);
      const T* xb = x + (t / blocks) * c * s + start;
      T* yb = y + (t / blocks) * c * s + start;
      static thread_local std::vector<A> scratch;  // this thread's per-position arrays, kept between calls
      static thread_local std::vector<double> sums;
      scratch.resize(size_t((kRowsAtOnce + 3) * kMaxBlock));
      sums.resize(size_t(2 * kMaxBlock));
      A *bufs = scratch.data(), *shift = bufs + kRowsAtOnce * kMaxBlock, *rstd = shift + kMaxBlock,
        *offset = rstd + kMaxBlock;
      double *dsum = sums.data(), *sq = dsum + kMaxBlock;
      const Loops<A>& L = loops<A>();
      std::copy_n(as_acc(xb, bufs, len), len, shift);
      std::fill(dsum, dsum + len, 0.0);
      std::fill(sq, sq + len, 0.0);
      for (int64_t ch = 1; ch < c; ch += kRowsAtOnce) {  // channel 0 adds d = 0
        const int count = int(std::min<int64_t>(kRowsAtOnce, c - ch));
        const A* rows[kRowsAtOnce];
        for (int r = 0; r < count; ++r) rows[r] = as_acc(xb + (ch + r) * s, bufs + r * kMaxBlock, len);
        L.add_moments(dsum, sq, rows, count, shift, len);
      }
      for (int64_t k = 0; k < len; ++k) {
        const double dm = dsum[k] / c, var = std::max(0.0, sq[k] / c - dm * dm);
        const double r = 1.0 / std::sqrt(var + attrs.epsilon);
        const SplitMean<A> mean(double(shift[k]) + dm);
        shift[k] = mean.hi;
        rstd[k] = A(r);
        offset[k] = A(-mean.lo * r);
      }
      for (int64_t ch = 0; ch < c; ++ch) {
        const A g = gamma[ch], b = beta ? beta[ch] : A(0);
        map_blocks(xb + ch * s, yb + ch * s, len, [&](const A* in, A* out, int64_t m, int64_t off) {
          L.normalize(in, out, m, shift + off, rstd + off, offset + off, g, b);
        });
      }
    });
  }
};

}  // namespace

void add_layer_norm(OpList& ops) { add_kernels<LayerNorm>(ops); }

}  // namespace normfold

// SkipLayerNorm(X, skip, scale, bias?) -> Y and SkipRMSNorm(X, skip, scale) -> Y: a residual
// add fused into a last-axes LayerNorm / RMSNorm (the pre-norm and post-norm transformer block),
//   sum = X + skip,  Y = LayerNorm(sum) / RMSNorm(sum) over axes [axis, rank);
// the sum is added in float for fp16/bf16 and normalized unrounded (as onnxruntime runs the function
// body), the sum output is rounded to T (as the Add it replaces).
// skip has X's shape; scale/bias have prod(X.shape[axis:]) elements. SkipLayerNormSum / SkipRMSNormSum
// (same inputs) also output the sum, for the graph's other readers of it. Attributes: axis = -1, epsilon (LayerNorm: 1e-5;
// RMSNorm: required).
//
// The data is read once: each row's sum is made in a per-thread buffer (or, fp32, straight into the sum
// output) that the statistics and the write pass then read from cache. CUDA: the row kernels of
// cuda_kernels.h with `skip` (and `sum`); they normalize the sum rounded to T (a CUDA fp16 Add
// rounds, where onnxruntime's CPU provider adds fp16 in float), so for fp16/bf16 the CPU and CUDA kernels
// differ by that one rounding.
#include <cmath>

#include "loops.h"
#include "ort_glue.h"
#include "parallel.h"

namespace normfold {
namespace {

/// The shapes are the same where both are known.
bool same_shape(const Shape& a, const Shape& b) {
  if (a.size() != b.size()) return a == Shape{-1} || b == Shape{-1};
  for (size_t i = 0; i < a.size(); ++i)
    if (a[i] >= 0 && b[i] >= 0 && a[i] != b[i]) return false;
  return true;
}

struct SkipAttrs {
  int64_t axis;
  float epsilon;

  SkipAttrs(const Attributes& a, std::optional<float> default_epsilon)
      : axis(a.get<int64_t>("axis").value_or(-1)) {
    const std::optional<float> e = a.get<float>("epsilon");
    if (!e && !default_epsilon) a.fail("epsilon must be set");
    epsilon = e.value_or(default_epsilon.value_or(0.0f));
    if (epsilon < 0) a.fail("epsilon must be >= 0");
  }

  std::string check(const InputShapes& in) const {
    const Shape& x = in[0];
    const int64_t first = normalized_axis(axis, x.size());
    if (first < 0) return "axis=" + std::to_string(axis) + " is out of range for X of shape " + str(x);
    if (!same_shape(x, in[1])) return "skip must have X's shape " + str(x) + ", got " + str(in[1]);
    const int64_t d = numel(x, size_t(first));
    const std::string e = check_count("scale", in[2], d);
    const Shape* bias = in.optional(3);
    return e.empty() && bias ? check_count("bias", *bias, d) : e;
  }
};

struct SkipLayerNormAttrs : SkipAttrs {
  static constexpr const char* kName = "SkipLayerNorm";
  explicit SkipLayerNormAttrs(const Attributes& a) : SkipAttrs(a, 1e-5f) {}
};

struct SkipRMSNormAttrs : SkipAttrs {
  static constexpr const char* kName = "SkipRMSNorm";
  explicit SkipRMSNormAttrs(const Attributes& a) : SkipAttrs(a, std::nullopt) {}
};

/// s = x + skip over [0, n) in the arithmetic type (for fp16/bf16 not rounded to T: onnxruntime's CPU
/// provider has no fp16 Add, so the function body's Add runs in float with its Cast pair removed, and the
/// norm reads the float sum); `rounded`, when set, gets the sum in T (the graph's other readers of the Add).
template <class T>
void add_rows(const T* x, const T* skip, Acc<T>* s, T* rounded, int64_t n) {
  using A = Acc<T>;
  if constexpr (std::is_same_v<T, A>) {
    loops<A>().add(x, skip, s, n);
    if (rounded && rounded != s) std::copy(s, s + n, rounded);
  } else {
    alignas(64) A b[kBlock];
    for (int64_t off = 0; off < n; off += kBlock) {
      const int64_t len = std::min(kBlock, n - off);
      load(x + off, s + off, len);
      load(skip + off, b, len);
      loops<A>().add(s + off, b, s + off, len);
      if (rounded) store(s + off, rounded + off, len);
    }
  }
}

/// rows x d: sum = x + skip (also into `sums` when the node outputs it), then the row norm of the sum.
template <class T>
void skip_norm(OrtKernelContext* ctx, const T* x, const T* skip, T* y, T* sums, int64_t rows, int64_t d,
               const Acc<T>* gamma, const Acc<T>* beta, double epsilon, bool centered) {
  using A = Acc<T>;
  A* whole = nullptr;  // every row's sum in A, when rows are split across tasks (for_instances) or it is an output
  if constexpr (std::is_same_v<T, A>) whole = sums;
  std::vector<A> storage;
  if (!whole && rows < 16 && d >= 2 * kTaskElems) {
    storage.resize(size_t(rows * d));
    whole = storage.data();
  }
  auto sum_of = [&](int64_t i, int64_t lo, int64_t n) -> A* {
    if (whole) return whole + i * d + lo;
    // stats and write pass of a row run in one task, on one thread; 64-byte aligned like the loops' stores, so
    // the statistics' loads of the fresh sum are forwarded from them
    static thread_local std::vector<A> row;
    constexpr size_t kLine = 64 / sizeof(A);
    if (row.size() < size_t(n) + kLine) row.resize(size_t(n) + kLine);
    return row.data() + (kLine - reinterpret_cast<uintptr_t>(row.data()) % 64 / sizeof(A)) % kLine;
  };
  for_instances(
      ctx, rows, d,
      [&](int64_t i, int64_t lo, int64_t hi) {
        A* s = sum_of(i, lo, hi - lo);
        add_rows(x + i * d + lo, skip + i * d + lo, s, sums ? sums + i * d + lo : nullptr, hi - lo);
        return centered ? moments(s, hi - lo) : squares(s, hi - lo);
      },
      [&](int64_t i, int64_t lo, int64_t hi, const Moments& m) {
        const A* s = sum_of(i, lo, hi - lo);
        const double rstd = 1.0 / std::sqrt((centered ? m.variance() : m.m2 / m.n) + epsilon);
        const SplitMean<A> mean(centered ? m.mean : 0.0);
        const A r = A(rstd), offset = A(-mean.lo * rstd);
        map_blocks(s, y + i * d + lo, hi - lo, [&](const A* in, A* out, int64_t len, int64_t off) {
          loops<A>().scale_shift(in, out, len, mean.hi, r, offset, gamma + lo + off, beta ? beta + lo + off : nullptr);
        });
      });
}

template <class T, class Attrs, bool kCuda>
struct SkipKernel : Kernel<Attrs> {
  using Kernel<Attrs>::Kernel;
  using Tensor = Ort::Custom::Tensor<T>;

  Ort::Status run(OrtKernelContext* ctx, const Tensor& X, const Tensor& skip, const Tensor& scale,
                  std::optional<const Tensor*> bias, Tensor& Y, std::optional<Tensor*> sum, bool centered) {
    const Shape& shape = X.Shape();
    const int64_t d = numel(shape, size_t(normalized_axis(this->attrs.axis, shape.size())));
#ifdef NORMFOLD_WITH_CUDA
    if constexpr (kCuda) {
      const cuda::RowNorm p{.x = X.Data(), .skip = skip.Data(), .gamma = scale.Data(),
                            .beta = bias ? (*bias)->Data() : nullptr, .y = Y.Allocate(shape),
                            .sum = sum ? (*sum)->Allocate(shape) : nullptr, .count = d ? numel(shape) / d : 0,
                            .size = d, .epsilon = this->attrs.epsilon, .centered = centered};
      return status_of(cuda::row_norm(p, cuda_dtype<T>(), cuda_stream(ctx)));
    }
#endif
    std::vector<Acc<T>> gamma_values, beta_values;  // converted copies, fp16/bf16 only
    const Acc<T>* gamma = acc_values(scale.Data(), d, gamma_values);
    const Acc<T>* beta = bias ? acc_values((*bias)->Data(), d, beta_values) : nullptr;
    T* y = Y.Allocate(shape);
    T* sums = sum ? (*sum)->Allocate(shape) : nullptr;
    skip_norm(ctx, X.Data(), skip.Data(), y, sums, d ? numel(shape) / d : 0, d, gamma, beta, this->attrs.epsilon,
              centered);
    return Ort::Status{nullptr};
  }
};

template <class T, bool kCuda>
struct SkipLayerNorm : SkipKernel<T, SkipLayerNormAttrs, kCuda> {
  using SkipKernel<T, SkipLayerNormAttrs, kCuda>::SkipKernel;
  using Tensor = Ort::Custom::Tensor<T>;

  Ort::Status Compute(OrtKernelContext* ctx, const Tensor& X, const Tensor& skip, const Tensor& scale,
                      std::optional<const Tensor*> bias, Tensor& Y, std::optional<Tensor*> sum) {
    if (auto e = this->check(X, skip, scale, bias); !e.empty()) return status_of(e);
    return this->run(ctx, X, skip, scale, bias, Y, sum, true);
  }
};

template <class T, bool kCuda>
struct SkipRMSNorm : SkipKernel<T, SkipRMSNormAttrs, kCuda> {
  using SkipKernel<T, SkipRMSNormAttrs, kCuda>::SkipKernel;
  using Tensor = Ort::Custom::Tensor<T>;

  Ort::Status Compute(OrtKernelContext* ctx, const Tensor& X, const Tensor& skip, const Tensor& scale, Tensor& Y,
                      std::optional<Tensor*> sum) {
    if (auto e = this->check(X, skip, scale); !e.empty()) return status_of(e);
    return this->run(ctx, X, skip, scale, std::nullopt, Y, sum, false);
  }
};

}  // namespace

// SkipLayerNorm / SkipRMSNorm output Y; SkipLayerNormSum / SkipRMSNormSum also the sum (same kernels: the
// sum output is optional in the kernel; separate op names give each its own ONNX function body).
void add_skip_norms(OpList& ops) {
  add_kernels<SkipLayerNorm>(ops, "SkipLayerNorm", outputs_as_input);
  add_kernels<SkipLayerNorm>(ops, "SkipLayerNormSum", outputs_as_input);
  add_kernels<SkipRMSNorm>(ops, "SkipRMSNorm", outputs_as_input);
  add_kernels<SkipRMSNorm>(ops, "SkipRMSNormSum", outputs_as_input);
}

}  // namespace normfold

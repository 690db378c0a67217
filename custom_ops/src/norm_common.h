// Shared helpers of normfold's CPU kernels: attributes and errors, dtype
// conversion in blocks, numerically stable statistics, parallel loops and the
// fused write pass. Each op's .cc holds only its attributes, kernel and
// registration.
#pragma once
#define ORT_API_MANUAL_INIT
#include "onnxruntime_lite_custom_op.h"
#undef ORT_API_MANUAL_INIT
#ifdef NORMFOLD_WITH_CUDA
#include "cuda_kernels.h"
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

namespace normfold {

constexpr const char* kDomain = "com.normfold";
using Shape = std::vector<int64_t>;  // -1: a dimension unknown before Compute
using OpList = std::vector<std::unique_ptr<Ort::Custom::OrtLiteCustomOp>>;

// ---------------------------------------------------------------- errors, attributes, shapes

/// Thrown from a kernel constructor: onnxruntime fails session creation with this message.
[[noreturn]] inline void fail(const std::string& message) {
  throw Ort::Exception(std::string(message), ORT_INVALID_ARGUMENT);
}

/// Status returned from Compute for a bad input ("" means OK).
inline Ort::Status status_of(const std::string& error) {
  return error.empty() ? Ort::Status{nullptr} : Ort::Status(error.c_str(), ORT_INVALID_ARGUMENT);
}

/// Attribute `name`, or nullopt when the node does not set it. Set with another type (epsilon=1,
/// an int) it is an error, not silently the default.
template <class T>
std::optional<T> attribute(const OrtKernelInfo* info, const char* op, const char* name) {
  const Ort::ConstKernelInfo kernel_info(info);
  try {
    return kernel_info.GetAttribute<T>(name);
  } catch (const Ort::Exception&) {
  }
  auto is_set = [&](auto get) {
    try {
      get();
      return true;
    } catch (const Ort::Exception&) {
      return false;
    }
  };
  if (is_set([&] { kernel_info.GetAttribute<int64_t>(name); }) || is_set([&] { kernel_info.GetAttribute<float>(name); }) ||
      is_set([&] { kernel_info.GetAttribute<std::string>(name); }) ||
      is_set([&] { kernel_info.GetAttributes<int64_t>(name); }) || is_set([&] { kernel_info.GetAttributes<float>(name); }))
    fail(std::string(op) + ": " + name + " must be " +
         (std::is_same_v<T, float> ? "a float" : std::is_same_v<T, int64_t> ? "an int" : "a string") +
         "; the node sets it with another attribute type");
  return std::nullopt;
}

/// Shape of input `i` known at session creation (unknown dims are -1), or nullopt if even the rank is unknown.
inline std::optional<Shape> static_shape(const OrtKernelInfo* info, size_t i) {
  try {
    auto type = Ort::ConstKernelInfo(info).GetInputTypeInfo(i);
    Shape s = type.GetTensorTypeAndShapeInfo().GetShape();
    if (s.empty()) return std::nullopt;
    for (auto& d : s) d = d < 0 ? -1 : d;
    return s;
  } catch (const Ort::Exception&) {
    return std::nullopt;
  }
}

/// Fails when an input is given as "" (the lite API cannot skip an input in the middle):
/// optional inputs are left out from the end instead.
inline void require_present_inputs(const OrtKernelInfo* info, const char* op) {
  Ort::ConstKernelInfo kernel_info(info);
  for (size_t i = 0; i < kernel_info.GetInputCount(); ++i)
    if (kernel_info.GetInputName(i).empty())
      fail(std::string(op) + ": input " + std::to_string(i) + " is empty (''); leave optional inputs out instead");
}

/// Product of dims [from, to); -1 if any of them is unknown.
inline int64_t numel(const Shape& s, size_t from = 0, size_t to = SIZE_MAX) {
  int64_t n = 1;
  for (size_t i = from; i < std::min(to, s.size()); ++i) {
    if (s[i] < 0) return -1;
    n *= s[i];
  }
  return n;
}

inline std::string str(const Shape& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? "," : "") + (s[i] < 0 ? std::string("?") : std::to_string(s[i]));
  return out + "]";
}

/// "" if `param` (a per-channel/per-element parameter) has `expected` elements or either is unknown.
inline std::string check_count(const char* op, const char* what, const Shape& param, int64_t expected) {
  const int64_t n = numel(param);
  if (n < 0 || expected < 0 || n == expected) return "";
  return std::string(op) + ": " + what + " has shape " + str(param) + " (" + std::to_string(n) +
         " elements); expected " + std::to_string(expected) + " elements";
}

/// Shape and type inference of every op: output 0 is like input 0. (Set on the C struct: the lite
/// API's ShapeInferContext::SetOutputShape would declare a float output whatever the input type.)
inline OrtStatusPtr ORT_API_CALL same_as_input(const OrtCustomOp*, OrtShapeInferContext* ctx) {
  const OrtApi& api = Ort::GetApi();
  OrtTensorTypeAndShapeInfo* info = nullptr;  // owned by the context
  if (OrtStatus* status = api.ShapeInferContext_GetInputTypeShape(ctx, 0, &info)) return status;
  return api.ShapeInferContext_SetOutputTypeShape(ctx, 0, info);
}

/// Registers op `name`: Kernel<T, false> on the CPU for float, double, float16 and bfloat16, and
/// in the CUDA library also Kernel<T, true> on CUDA for float, float16 and bfloat16.
template <template <class, bool> class Kernel>
void add_kernels(OpList& ops, const char* name) {
  using Ort::Custom::CreateLiteCustomOp;
  const size_t first = ops.size();
  ops.emplace_back(CreateLiteCustomOp<Kernel<float, false>>(name, "CPUExecutionProvider"));
  ops.emplace_back(CreateLiteCustomOp<Kernel<double, false>>(name, "CPUExecutionProvider"));
  ops.emplace_back(CreateLiteCustomOp<Kernel<Ort::Float16_t, false>>(name, "CPUExecutionProvider"));
  ops.emplace_back(CreateLiteCustomOp<Kernel<Ort::BFloat16_t, false>>(name, "CPUExecutionProvider"));
#ifdef NORMFOLD_WITH_CUDA
  ops.emplace_back(CreateLiteCustomOp<Kernel<float, true>>(name, "CUDAExecutionProvider"));
  ops.emplace_back(CreateLiteCustomOp<Kernel<Ort::Float16_t, true>>(name, "CUDAExecutionProvider"));
  ops.emplace_back(CreateLiteCustomOp<Kernel<Ort::BFloat16_t, true>>(name, "CUDAExecutionProvider"));
#endif
  for (size_t i = first; i < ops.size(); ++i) ops[i]->InferOutputShapeFn = same_as_input;
}

#ifdef NORMFOLD_WITH_CUDA
/// The CUDA kernels' dtype tag of storage type T.
template <class T>
constexpr cuda::Dtype cuda_dtype() {
  if constexpr (std::is_same_v<T, Ort::Float16_t>) return cuda::Dtype::f16;
  else if constexpr (std::is_same_v<T, Ort::BFloat16_t>) return cuda::Dtype::bf16;
  else return cuda::Dtype::f32;
}

/// The CUDA stream onnxruntime runs this kernel on.
inline void* cuda_stream(OrtKernelContext* ctx) { return Ort::KernelContext(ctx).GetGPUComputeStream(); }
#endif

// Each op's file adds its kernels (register.cc calls them).
void add_group_norm(OpList& ops);
void add_layer_norm(OpList& ops);
void add_rms_norm(OpList& ops);
void add_filter_response_norm(OpList& ops);
void add_weight_norm(OpList& ops);

// ---------------------------------------------------------------- dtypes

/// Arithmetic type for storage type T: double for double, float otherwise.
template <class T>
using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;

inline float bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t float_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

/// Branch-free IEEE half <-> float (round to nearest even), so conversion loops vectorise.
inline float half_to_float(uint16_t h) {
  const uint32_t em = h & 0x7fffu;
  const uint32_t u = float_to_bits(bits_to_float(em << 13) * 0x1p112f) | (em >= 0x7c00u ? 0x7f800000u : 0u);
  return bits_to_float(u | (uint32_t(h & 0x8000u) << 16));
}
inline uint16_t float_to_half(float f) {
  const uint32_t u = float_to_bits(f), sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
  const uint32_t sub = float_to_bits(bits_to_float(a) + 0.5f) - float_to_bits(0.5f);  // |f| < 2^-14
  const uint32_t norm = (a + 0xc8000fffu + ((a >> 13) & 1u)) >> 13;                   // rebias, round
  const uint32_t big = a > 0x7f800000u ? 0x7e00u : 0x7c00u;                           // NaN / overflow
  return uint16_t(sign | (a >= 0x47800000u ? big : a < 0x38800000u ? sub : norm));
}
inline float bf16_to_float(uint16_t h) { return bits_to_float(uint32_t(h) << 16); }
inline uint16_t float_to_bf16(float f) {
  const uint32_t u = float_to_bits(f);
  return (u & 0x7fffffffu) > 0x7f800000u ? uint16_t((u >> 16) | 0x40u) : uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

inline uint16_t bits(Ort::Float16_t v) { uint16_t b; std::memcpy(&b, &v, 2); return b; }
inline uint16_t bits(Ort::BFloat16_t v) { uint16_t b; std::memcpy(&b, &v, 2); return b; }

/// One value of storage type T as its arithmetic type.
template <class T>
Acc<T> to_acc(T v) {
  if constexpr (std::is_same_v<T, Ort::Float16_t>) return half_to_float(bits(v));
  else if constexpr (std::is_same_v<T, Ort::BFloat16_t>) return bf16_to_float(bits(v));
  else return v;
}

/// Convert n values between storage type T and its arithmetic type.
template <class T>
void load(const T* src, Acc<T>* dst, int64_t n) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = std::is_same_v<T, Ort::Float16_t> ? half_to_float(s[i]) : bf16_to_float(s[i]);
}
template <class T>
void store(const Acc<T>* src, T* dst, int64_t n) {
  uint16_t* d = reinterpret_cast<uint16_t*>(dst);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) d[i] = std::is_same_v<T, Ort::Float16_t> ? float_to_half(src[i]) : float_to_bf16(src[i]);
}

constexpr int64_t kBlock = 1024;  // elements converted / reduced at a time (stays in L1)

/// `x` as its arithmetic type: x itself when T is float/double, else converted into `buf` (≥ n values).
template <class T>
const Acc<T>* as_acc(const T* x, Acc<T>* buf, int64_t n) {
  if constexpr (std::is_same_v<T, Acc<T>>) {
    return x;
  } else {
    load(x, buf, n);
    return buf;
  }
}

/// A whole parameter tensor as its arithmetic type (a view when no conversion is needed).
template <class T>
const Acc<T>* acc_values(const T* x, int64_t n, std::vector<Acc<T>>& storage) {
  if constexpr (std::is_same_v<T, Acc<T>>) return x;
  storage.resize(size_t(n));
  return as_acc(x, storage.data(), n);
}

/// Calls f(in, out, len, offset) on blocks of x[0, n) in arithmetic type; `out` is stored to y.
template <class T, class F>
void map_blocks(const T* x, T* y, int64_t n, F&& f) {
  using A = Acc<T>;
  alignas(64) A in_buf[kBlock], out_buf[kBlock];
  for (int64_t off = 0; off < n; off += kBlock) {
    const int64_t len = std::min(kBlock, n - off);
    if constexpr (std::is_same_v<T, A>) {
      f(x + off, y + off, len, off);
    } else {
      f(as_acc(x + off, in_buf, len), out_buf, len, off);
      store(out_buf, y + off, len);
    }
  }
}

// ---------------------------------------------------------------- statistics

/// Count, mean and sum of squared deviations; merged with Chan's formula, in double.
/// Uncentred statistics (RMS, FRN, norms) use mean = 0 and m2 = Σx².
struct Moments {
  double n = 0, mean = 0, m2 = 0;
  void merge(const Moments& o) {
    if (o.n == 0) return;
    const double total = n + o.n;
    const double delta = o.mean - mean;
    mean += delta * (o.n / total);
    m2 += o.m2 + delta * delta * (n * o.n / total);
    n = total;
  }
  double variance() const { return m2 / n; }
};

/// The mean split as hi + lo: hi is exact in A, so (x - hi) is exact for x near the mean and
/// lo is folded into the affine offset (keeps fp32 results accurate when mean ≫ std).
template <class A>
struct SplitMean {
  A hi;
  double lo;
  explicit SplitMean(double mean) : hi(A(mean)), lo(mean - double(A(mean))) {}
};

// ---------------------------------------------------------------- activations

struct Identity {
  template <class A> A operator()(A v) const { return v; }
};

/// x·sigmoid(x) with a vectorisable exp (Cephes polynomial, ~2 ulp) for float.
struct Silu {
  static float exp_(float x) {
    x = std::min(std::max(x, -87.3f), 88.7f);
    const float n = (x * 1.44269504f + 12582912.0f) - 12582912.0f;  // round(x / ln2)
    const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    return p * bits_to_float(uint32_t(int32_t(n) + 127) << 23);
  }
  static double exp_(double x) { return std::exp(x); }
  template <class A> A operator()(A v) const { return v / (A(1) + exp_(-v)); }
};

/// Thresholded linear unit max(x, tau) of Filter Response Normalization.
template <class A>
struct Tlu {
  A tau;
  A operator()(A v) const { return v > tau ? v : tau; }
};

enum class Act { kNone, kSilu, kTlu };  // activation fused in the write pass (kTlu takes tau)

// ---------------------------------------------------------------- hot loops
// Every kernel spends its time in these loops. They are written once (namespace simd) and
// compiled twice by cpu_loops.cc: for baseline x86-64 (SSE2) and with AVX2 (+FMA); `loops<A>()`
// gives the variant this CPU runs. Sums run in kLanes independent lanes added in a fixed order,
// so they vectorise without -ffast-math and give the same result on every CPU.

template <class A>
struct Loops {
  Moments (*moments)(const A* x, int64_t n);    // centred statistics of x[0, n)
  double (*sum_squares)(const A* x, int64_t n);  // Σx²
  /// out = act((in - shift)·a + b)
  void (*affine)(const A* in, A* out, int64_t n, A shift, A a, A b, Act act, A tau);
  /// out[k] = ((in[k] - shift)·r + offset)·g[k] (+ b[k] unless b is null): last-axes LayerNorm, RMSNorm
  void (*scale_shift)(const A* in, A* out, int64_t n, A shift, A r, A offset, const A* g, const A* b);
  // channel-first LayerNorm, per position k of a channel row:
  void (*add)(A* sum, const A* row, int64_t n);                                    // sum += row
  void (*add_centred)(A* dsum, A* sq, const A* row, const A* shift, int64_t n);   // Σd, Σd², d = row - shift
  /// out = ((in - shift)·rstd + offset)·g + b
  void (*normalize)(const A* in, A* out, int64_t n, const A* shift, const A* rstd, const A* offset, A g, A b);
};
template <class A>
const Loops<A>& loops();  // instantiated for float and double in cpu_loops.cc
extern template const Loops<float>& loops();
extern template const Loops<double>& loops();

namespace simd {
#define NORMFOLD_LOOP inline __attribute__((always_inline))  // inlined into each ISA's copy

template <class A>
constexpr int64_t kLanes = 64 / sizeof(A);  // one cache line: 2 AVX / 4 SSE registers per sum

/// Σ acc[0, kLanes), pairwise in a fixed order.
template <class A>
NORMFOLD_LOOP A total(A* acc) {
#pragma GCC unroll 8
  for (int64_t w = kLanes<A> / 2; w > 0; w /= 2)
#pragma GCC unroll 16
    for (int64_t j = 0; j < w; ++j) acc[j] += acc[j + w];
  return acc[0];
}

/// Σ f(x[i]) over i in [0, n), in lanes.
template <class A, class F>
NORMFOLD_LOOP A sum(const A* x, int64_t n, F f) {
  constexpr int64_t L = kLanes<A>;
  A acc[L] = {};
  int64_t i = 0;
  for (; i + L <= n; i += L)
#pragma omp simd
    for (int64_t j = 0; j < L; ++j) acc[j] += f(x[i + j]);
  A tail = 0;
  for (; i < n; ++i) tail += f(x[i]);
  return total(acc) + tail;
}

/// Mean and squared deviations of x[0, n ≤ kBlock): corrected two-pass over a block in L1,
/// so a large mean (x + 1000) does not cancel the variance away.
template <class A>
NORMFOLD_LOOP Moments block_moments(const A* x, int64_t n) {
  const A shift = sum(x, n, [](A v) { return v; }) / A(n);
  constexpr int64_t L = kLanes<A>;
  A ds[L] = {}, q[L] = {};
  int64_t i = 0;
  for (; i + L <= n; i += L)
#pragma omp simd
    for (int64_t j = 0; j < L; ++j) {
      const A d = x[i + j] - shift;
      ds[j] += d;
      q[j] += d * d;
    }
  A ds_tail = 0, q_tail = 0;
  for (; i < n; ++i) {
    const A d = x[i] - shift;
    ds_tail += d;
    q_tail += d * d;
  }
  const double s = double(total(ds) + ds_tail), sq = double(total(q) + q_tail);
  return {double(n), double(shift) + s / n, sq - s * s / n};
}

template <class A>
NORMFOLD_LOOP Moments moments(const A* x, int64_t n) {
  Moments m;
  for (int64_t off = 0; off < n; off += kBlock) m.merge(block_moments(x + off, std::min(kBlock, n - off)));
  return m;
}

template <class A>
NORMFOLD_LOOP double sum_squares(const A* x, int64_t n) {
  double s = 0;
  for (int64_t off = 0; off < n; off += kBlock) s += sum(x + off, std::min(kBlock, n - off), [](A v) { return v * v; });
  return s;
}

template <class A>
NORMFOLD_LOOP void affine(const A* in, A* out, int64_t n, A shift, A a, A b, Act act, A tau) {
  auto apply = [&](auto f) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = f((in[i] - shift) * a + b);
  };
  if (act == Act::kSilu) apply(Silu{});
  else if (act == Act::kTlu) apply(Tlu<A>{tau});
  else apply(Identity{});
}

template <class A>
NORMFOLD_LOOP void scale_shift(const A* in, A* out, int64_t n, A shift, A r, A offset, const A* g, const A* b) {
  if (b) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = ((in[i] - shift) * r + offset) * g[i] + b[i];
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = ((in[i] - shift) * r + offset) * g[i];
  }
}

template <class A>
NORMFOLD_LOOP void add(A* sum, const A* row, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) sum[i] += row[i];
}

template <class A>
NORMFOLD_LOOP void add_centred(A* dsum, A* sq, const A* row, const A* shift, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const A d = row[i] - shift[i];
    dsum[i] += d;
    sq[i] += d * d;
  }
}

template <class A>
NORMFOLD_LOOP void normalize(const A* in, A* out, int64_t n, const A* shift, const A* rstd, const A* offset, A g, A b) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = ((in[i] - shift[i]) * rstd[i] + offset[i]) * g + b;
}
}  // namespace simd

// ---------------------------------------------------------------- typed entry points

/// Centred statistics of x[0, n) for any storage type.
template <class T>
Moments moments(const T* x, int64_t n) {
  using A = Acc<T>;
  if constexpr (std::is_same_v<T, A>) {
    return loops<A>().moments(x, n);
  } else {
    alignas(64) A buf[kBlock];
    Moments m;
    for (int64_t off = 0; off < n; off += kBlock) {
      const int64_t len = std::min(kBlock, n - off);
      m.merge(loops<A>().moments(as_acc(x + off, buf, len), len));
    }
    return m;
  }
}

/// Uncentred statistics of x[0, n): mean = 0, m2 = Σx².
template <class T>
Moments squares(const T* x, int64_t n) {
  using A = Acc<T>;
  if constexpr (std::is_same_v<T, A>) return {double(n), 0.0, loops<A>().sum_squares(x, n)};
  alignas(64) A buf[kBlock];
  double total = 0;
  for (int64_t off = 0; off < n; off += kBlock) {
    const int64_t len = std::min(kBlock, n - off);
    total += loops<A>().sum_squares(as_acc(x + off, buf, len), len);
  }
  return {double(n), 0.0, total};
}

/// y = act((x - shift)·a + b) over x[0, n): the fused write pass of per-channel normalizations.
template <class T>
void affine(const T* x, T* y, int64_t n, Acc<T> shift, Acc<T> a, Acc<T> b, Act act = Act::kNone, Acc<T> tau = 0) {
  const auto& L = loops<Acc<T>>();
  map_blocks(x, y, n, [&](const Acc<T>* in, Acc<T>* out, int64_t len, int64_t) { L.affine(in, out, len, shift, a, b, act, tau); });
}

// ---------------------------------------------------------------- parallel loops

/// Runs fn(i) for i in [0, n) on the session's intra-op thread pool.
template <class F>
void parallel_for(OrtKernelContext* ctx, int64_t n, F&& fn) {
  using Fn = std::remove_reference_t<F>;
  if (n <= 1) {
    if (n == 1) fn(int64_t(0));
    return;
  }
  void* data = const_cast<void*>(static_cast<const void*>(&fn));
  Ort::KernelContext(ctx).ParallelFor([](void* f, size_t i) { (*static_cast<Fn*>(f))(int64_t(i)); }, size_t(n), 0, data);
}

constexpr int64_t kTaskElems = 32 * 1024;  // elements per parallel task, at least

/// The two-pass skeleton shared by the ops: `count` instances of `size` elements, each with
/// statistics stats(i, lo, hi) -> Moments over its elements [lo, hi) and a write pass
/// apply(i, lo, hi, moments). Small instances run stats and write in one task (the second read
/// hits the cache); when there are few large instances, each is split across tasks.
template <class Stats, class Apply>
void for_instances(OrtKernelContext* ctx, int64_t count, int64_t size, Stats&& stats, Apply&& apply) {
  if (count <= 0 || size <= 0) return;
  const int64_t parts = count >= 16 ? 1 : std::clamp<int64_t>(size / kTaskElems, 1, 32 / count);
  if (parts == 1) {
    const int64_t per_task = std::max<int64_t>(1, kTaskElems / size);
    parallel_for(ctx, (count + per_task - 1) / per_task, [&](int64_t t) {
      for (int64_t i = t * per_task; i < std::min(count, (t + 1) * per_task); ++i) apply(i, int64_t(0), size, stats(i, int64_t(0), size));
    });
    return;
  }
  const int64_t step = (size + parts - 1) / parts;
  std::vector<Moments> part(size_t(count * parts));
  parallel_for(ctx, count * parts, [&](int64_t t) {
    const int64_t lo = (t % parts) * step;
    part[size_t(t)] = stats(t / parts, lo, std::min(size, lo + step));
  });
  for (int64_t i = 0; i < count; ++i)
    for (int64_t p = 1; p < parts; ++p) part[size_t(i * parts)].merge(part[size_t(i * parts + p)]);
  parallel_for(ctx, count * parts, [&](int64_t t) {
    const int64_t lo = (t % parts) * step;
    if (lo < size) apply(t / parts, lo, std::min(size, lo + step), part[size_t(t - t % parts)]);
  });
}

}  // namespace normfold

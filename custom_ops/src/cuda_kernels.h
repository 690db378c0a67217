// CUDA kernels of the normfold ops, callable from plain C++ (the op files): each launcher
// enqueues on `stream` and returns "" or the CUDA error. Storage types: float, half, bfloat16;
// arithmetic in float. Nothing is allocated and nothing synchronises.
#pragma once
#include <cstdint>
#include <string>

#include "activation.h"

namespace normfold::cuda {

enum class Dtype { f32, f16, bf16 };

/// Which kernel a launcher uses. `automatic`: the single-read on-chip kernel when the slice fits
/// in shared memory, else the two-pass kernel. The others force one (tests, benchmarks); forcing
/// `on_chip` for a slice that does not fit returns an error.
enum class Path { automatic, on_chip, two_pass };

/// `count` instances of `size` contiguous elements, normalized each on its own (GroupNorm, FRN,
/// last-axes LayerNorm and RMSNorm). Element k of instance i uses parameter
/// (i % period) * (size / spatial) + k / spatial. Fill it with designated initialisers; the
/// defaults are a last-axes row norm (a parameter per element) without activation.
/// The fused adds: `skip` (SkipLayerNorm / SkipRMSNorm) normalizes x + skip rounded to T, as the Add it
/// replaces, and writes that sum to `sum` when set; `add` (BiasGroupNorm) normalizes x + add in float,
/// element k of instance i adding add[i * (size / spatial) + k / spatial] (one value per channel).
struct RowNorm {
  const void* x = nullptr;
  const void* skip = nullptr;   // x's layout; null: no residual add
  const void* add = nullptr;    // count * (size / spatial) values; null: no per-channel add
  const void* gamma = nullptr;  // null: scale 1
  const void* beta = nullptr;   // null: shift 0
  const void* tau = nullptr;    // TLU thresholds, read only with Activation::kTlu
  void* y = nullptr;
  void* sum = nullptr;          // x's layout: x + skip as normalized; null: not written
  int64_t count = 0;    // instances
  int64_t size = 0;     // elements per instance
  int64_t spatial = 1;  // consecutive elements sharing one parameter
  int64_t period = 1;   // instance i uses parameter set i % period
  float epsilon = 0.f;
  bool centered = true;  // subtract the mean (GroupNorm, LayerNorm) or not (RMSNorm, FRN, WeightNorm)
  Activation activation = Activation::kNone;
};

std::string row_norm(const RowNorm& p, Dtype dtype, void* stream);
std::string row_norm(const RowNorm& p, Dtype dtype, void* stream, Path path);

/// N x C x S, normalized over C for every (n, s) (channel-first LayerNorm).
std::string channel_norm(const void* x, const void* gamma, const void* beta, void* y, int64_t n, int64_t c,
                         int64_t s, float epsilon, Dtype dtype, void* stream);
std::string channel_norm(const void* x, const void* gamma, const void* beta, void* y, int64_t n, int64_t c,
                         int64_t s, float epsilon, Dtype dtype, void* stream, Path path);

/// V as outer x D x inner: w = g_j v / ||v_j|| for every j of D.
std::string weight_norm(const void* v, const void* g, void* w, int64_t outer, int64_t d, int64_t inner, Dtype dtype,
                        void* stream);

/// Whether `automatic` would take the on-chip kernel on the current device (for reports).
bool row_fits_on_chip(int64_t size, Dtype dtype);
bool channel_fits_on_chip(int64_t c, Dtype dtype);

}  // namespace normfold::cuda

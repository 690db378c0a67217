// A C ABI over the CUDA launchers of cuda_kernels.h, for tests and benchmarks that call the kernels
// directly (ctypes + torch CUDA tensors) without onnxruntime-gpu. The CMake target
// normfold_cuda_harness (`NORMFOLD_HARNESS=1 bash custom_ops/build.sh`) builds it into
// custom_ops/build/harness/libnormfold_cuda_harness.so; it is not part of the op library.
//
// Pointers are device pointers, `stream` a cudaStream_t (torch: torch.cuda.current_stream().cuda_stream).
// dtype: 0 float32, 1 float16, 2 bfloat16. path: 0 automatic, 1 on-chip, 2 two-pass.
// activation: the values of normfold::Activation (0 none, 1 SiLU, 2 TLU).
// Each launcher returns NULL, or an error message valid until the calling thread's next call.
#include <string>

#include "cuda_kernels.h"
#include "fast_div.h"

namespace {

using namespace normfold::cuda;
using normfold::Activation;

const char* result(std::string e) {
  thread_local std::string message;
  message = std::move(e);
  return message.empty() ? nullptr : message.c_str();
}

bool bad(int dtype, int path) { return dtype < 0 || dtype > 2 || path < 0 || path > 2; }
bool bad_activation(int a) { return a < int(Activation::kNone) || a > int(Activation::kTlu); }

}  // namespace

extern "C" {

/// RowNorm's fields in its order; skip, add and sum may be NULL (no fused add, no sum output).
__attribute__((visibility("default"))) const char* nf_row_norm(const void* x, const void* skip, const void* add,
                                                               const void* gamma, const void* beta, const void* tau,
                                                               void* y, void* sum, int64_t count, int64_t size,
                                                               int64_t spatial, int64_t period, float epsilon,
                                                               int centered, int activation, int dtype, int path,
                                                               void* stream) {
  if (bad(dtype, path)) return result("bad dtype or path");
  if (spatial <= 0 || period <= 0 || size % spatial) return result("bad spatial or period");
  if (bad_activation(activation)) return result("bad activation");
  const RowNorm p{.x = x, .skip = skip, .add = add, .gamma = gamma, .beta = beta, .tau = tau, .y = y, .sum = sum,
                  .count = count, .size = size, .spatial = spatial, .period = period, .epsilon = epsilon,
                  .centered = centered != 0, .activation = Activation(activation)};
  return result(row_norm(p, Dtype(dtype), stream, Path(path)));
}

__attribute__((visibility("default"))) const char* nf_channel_norm(const void* x, const void* gamma, const void* beta,
                                                                   void* y, int64_t n, int64_t c, int64_t s,
                                                                   float epsilon, int dtype, int path, void* stream) {
  if (bad(dtype, path)) return result("bad dtype or path");
  return result(channel_norm(x, gamma, beta, y, n, c, s, epsilon, Dtype(dtype), stream, Path(path)));
}

__attribute__((visibility("default"))) const char* nf_weight_norm(const void* v, const void* g, void* w, int64_t outer,
                                                                  int64_t d, int64_t inner, int dtype, void* stream) {
  if (bad(dtype, 0)) return result("bad dtype");
  return result(weight_norm(v, g, w, outer, d, inner, Dtype(dtype), stream));
}

/// k / d as the kernels compute it (FastDiv, run on the host): for the tests.
__attribute__((visibility("default"))) uint32_t nf_fast_div(uint32_t k, uint32_t d) { return FastDiv(d)(k); }

/// Which kernel `automatic` takes on the current device: 1 on-chip, 2 two-pass.
__attribute__((visibility("default"))) int nf_row_path(int64_t size, int dtype) {
  return row_fits_on_chip(size, Dtype(dtype)) ? 1 : 2;
}
__attribute__((visibility("default"))) int nf_channel_path(int64_t c, int64_t s, int dtype) {
  if (s == 1) return nf_row_path(c, dtype);
  return channel_fits_on_chip(c, Dtype(dtype)) ? 1 : 2;
}

}  // extern "C"

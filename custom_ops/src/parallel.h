// Work on onnxruntime's intra-op thread pool, and the two-pass skeleton (statistics, then the
// write pass) every per-instance normalization runs on it.
#pragma once
#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "ort_api.h"
#include "statistics.h"

namespace normfold {

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

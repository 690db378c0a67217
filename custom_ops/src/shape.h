// Shapes of the op inputs as far as they are known, and the checks that compare them.
#pragma once
#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace normfold {

using Shape = std::vector<int64_t>;  // -1: a dimension unknown before Compute

/// Product of dims [from, to); -1 if any of them is unknown.
inline int64_t numel(const Shape& s, size_t from = 0, size_t to = SIZE_MAX) {
  int64_t n = 1;
  for (size_t i = from; i < std::min(to, s.size()); ++i) {
    if (s[i] < 0) return -1;
    n *= s[i];
  }
  return n;
}

/// "[2,?,5]".
inline std::string str(const Shape& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) {
    if (i) out += ",";
    out += s[i] < 0 ? std::string("?") : std::to_string(s[i]);
  }
  return out + "]";
}

/// `axis` (negative counts from the end) as an index in [0, rank), or -1 if out of range.
inline int64_t normalized_axis(int64_t axis, size_t rank) {
  const int64_t a = axis < 0 ? axis + int64_t(rank) : axis;
  return a >= 0 && a < int64_t(rank) ? a : -1;
}

/// "" if `param` (a per-channel/per-element parameter) has `expected` elements or either is unknown.
inline std::string check_count(const char* what, const Shape& param, int64_t expected) {
  const int64_t n = numel(param);
  if (n < 0 || expected < 0 || n == expected) return "";
  return std::string(what) + " has shape " + str(param) + " (" + std::to_string(n) + " elements); expected " +
         std::to_string(expected) + " elements";
}

/// Shapes of a node's inputs: one per input given (optional inputs are left out from the end),
/// {-1} for an input whose shape is unknown. It points at shapes held elsewhere, so building one on
/// every Compute allocates nothing.
struct InputShapes {
  static constexpr size_t kMax = 8;  // more inputs than any op has

  void add(const Shape& s) {
    if (count_ < kMax) given_[count_++] = &s;
  }
  const Shape& operator[](size_t i) const { return i < count_ ? *given_[i] : unknown(); }  // a required input
  const Shape* optional(size_t i) const { return i < count_ ? given_[i] : nullptr; }

 private:
  static const Shape& unknown() {
    static const Shape s{-1};
    return s;
  }
  const Shape* given_[kMax] = {};
  size_t count_ = 0;
};

}  // namespace normfold

// The attributes every GroupNorm kernel takes (GroupNorm, BiasGroupNorm) and the checks of X they imply:
// num_groups (required, divides C), epsilon = 1e-5, activation = "none"|"silu".
#pragma once

#include <string>

#include "activation.h"
#include "ort_glue.h"

namespace normfold {

struct GroupNormSettings {
  int64_t groups;
  float epsilon;
  Activation activation = Activation::kNone;

  explicit GroupNormSettings(const Attributes& a)
      : groups(a.get<int64_t>("num_groups").value_or(0)), epsilon(a.get<float>("epsilon").value_or(1e-5f)) {
    const std::string act = a.get<std::string>("activation").value_or("none");
    if (groups <= 0) a.fail("attribute num_groups must be set to a positive integer");
    if (epsilon < 0) a.fail("epsilon must be >= 0");
    if (act != "none" && act != "silu") a.fail("activation must be 'none' or 'silu', got '" + act + "'");
    if (act == "silu") activation = Activation::kSilu;
  }

  /// X is N x C x ... with C divisible by num_groups; "" when it is (or the sizes are not known yet).
  std::string check_x(const Shape& x) const {
    if (x.size() < 2) return "X must be N x C x ... (rank >= 2), got shape " + str(x);
    if (x[1] >= 0 && x[1] % groups)
      return "C=" + std::to_string(x[1]) + " is not divisible by num_groups=" + std::to_string(groups);
    return "";
  }
};

}  // namespace normfold

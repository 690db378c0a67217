// The activation a normalization fuses into its write pass, one enum for the CPU and the CUDA kernels.
#pragma once

namespace normfold {

enum class Activation : int {
  kNone = 0,
  kSilu = 1,  // y·sigmoid(y) (GroupNorm activation="silu")
  kTlu = 2,   // max(y, tau) with a per-channel tau (FilterResponseNorm use_tlu=1)
};

}  // namespace normfold

// The onnxruntime C++ API, initialised by RegisterCustomOps (register.cc) rather than at load time.
#pragma once
#define ORT_API_MANUAL_INIT
#include "onnxruntime_lite_custom_op.h"
#undef ORT_API_MANUAL_INIT

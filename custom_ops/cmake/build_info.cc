// Compiled into each library by cmake/install.cmake: what this library was built against,
// read by `normfold doctor` (ctypes) to tell whether the onnxruntime at run time is compatible.
#include "onnxruntime_c_api.h"

extern "C" __attribute__((visibility("default"))) int NormfoldOrtApiVersion() { return ORT_API_VERSION; }

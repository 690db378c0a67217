// Entry point onnxruntime calls when the library is registered:
// SessionOptions.register_custom_ops_library(path).
#include <mutex>

#include "ort_glue.h"

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) return nullptr;  // onnxruntime older than these headers: nothing we can report through
  Ort::InitApi(api);
  static std::mutex mutex;
  static normfold::OpList ops;
  static std::vector<Ort::CustomOpDomain> domains;  // must outlive every session using them
  try {
    std::lock_guard<std::mutex> lock(mutex);
    if (ops.empty()) {
      normfold::add_group_norm(ops);
      normfold::add_layer_norm(ops);
      normfold::add_rms_norm(ops);
      normfold::add_filter_response_norm(ops);
      normfold::add_weight_norm(ops);
      normfold::add_skip_norms(ops);
      normfold::add_bias_group_norm(ops);
    }
    Ort::CustomOpDomain domain{normfold::kDomain};
    for (auto& op : ops) domain.Add(op.get());
    Ort::UnownedSessionOptions(options).Add(domain);
    domains.push_back(std::move(domain));
  } catch (const std::exception& e) {
    return Ort::Status(e).release();
  }
  return nullptr;
}

// Registration of ops that have CPU kernels only (in the CUDA library onnxruntime runs them on the CPU).
#pragma once
#include <algorithm>
#include <vector>

#include "ort_glue.h"

namespace normfold {

/// Output 0 as `same_as_input`; an optional output 1 (the Skip...Sum ops' sum) like input 0 when its shape is
/// fully known, else left undeclared (an unknown size handed back as -1 would be taken for a size). A node
/// that leaves output 1 out has none to set: that error is dropped.
inline OrtStatusPtr ORT_API_CALL outputs_as_input(const OrtCustomOp* op, OrtShapeInferContext* ctx) {
  if (OrtStatusPtr status = same_as_input(op, ctx)) return status;
  const OrtApi& api = Ort::GetApi();
  OrtTensorTypeAndShapeInfo* info = nullptr;  // owned by the context
  size_t rank = 0;
  if (OrtStatusPtr status = api.ShapeInferContext_GetInputTypeShape(ctx, 0, &info)) return status;
  if (OrtStatusPtr status = api.GetDimensionsCount(info, &rank)) return status;
  std::vector<int64_t> dims(rank);
  if (OrtStatusPtr status = api.GetDimensions(info, dims.data(), rank)) return status;
  if (rank == 0 || std::any_of(dims.begin(), dims.end(), [](int64_t d) { return d < 0; })) return nullptr;
  if (OrtStatusPtr status = api.ShapeInferContext_SetOutputTypeShape(ctx, 1, info)) api.ReleaseStatus(status);
  return nullptr;
}

/// Op<T, false> as op `name` on the CPU for float, double, float16 and bfloat16 (no CUDA kernels).
template <template <class, bool> class Op>
void add_cpu_kernels(OpList& ops, const char* name) {
  using Ort::Custom::CreateLiteCustomOp;
  const size_t first = ops.size();
  ops.emplace_back(CreateLiteCustomOp<Op<float, false>>(name, "CPUExecutionProvider"));
  ops.emplace_back(CreateLiteCustomOp<Op<double, false>>(name, "CPUExecutionProvider"));
  ops.emplace_back(CreateLiteCustomOp<Op<Ort::Float16_t, false>>(name, "CPUExecutionProvider"));
  ops.emplace_back(CreateLiteCustomOp<Op<Ort::BFloat16_t, false>>(name, "CPUExecutionProvider"));
  for (size_t i = first; i < ops.size(); ++i) ops[i]->InferOutputShapeFn = outputs_as_input;
}

}  // namespace normfold

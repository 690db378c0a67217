// Registration of ops that have CPU kernels only (in the CUDA library onnxruntime runs them on the CPU).
#pragma once
#include "ort_glue.h"

namespace normfold {

/// Every output is like input 0 (a node may leave optional outputs out: those are not set).
inline OrtStatusPtr ORT_API_CALL outputs_as_input(const OrtCustomOp* op, OrtShapeInferContext* ctx) {
  if (OrtStatusPtr status = same_as_input(op, ctx)) return status;
  const OrtApi& api = Ort::GetApi();
  OrtTensorTypeAndShapeInfo* info = nullptr;  // owned by the context
  if (OrtStatusPtr status = api.ShapeInferContext_GetInputTypeShape(ctx, 0, &info)) return status;
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

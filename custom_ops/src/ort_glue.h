// What ties a kernel to onnxruntime: errors, attributes, the shape checks every op runs at session
// creation and in Compute (the Kernel base), and registration of an op's kernels for each type.
#pragma once
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "compute_call.h"
#include "ort_api.h"
#include "shape.h"
#ifdef NORMFOLD_WITH_CUDA
#include "cuda_kernels.h"
#endif

namespace normfold {

constexpr const char* kDomain = "com.normfold";
using OpList = std::vector<std::unique_ptr<Ort::Custom::OrtLiteCustomOp>>;

/// Thrown from a kernel constructor: onnxruntime fails session creation with this message.
[[noreturn]] inline void fail(const std::string& message) {
  throw Ort::Exception(std::string(message), ORT_INVALID_ARGUMENT);
}

/// Status returned from Compute for a bad input ("" means OK).
inline Ort::Status status_of(const std::string& error) {
  return error.empty() ? Ort::Status{nullptr} : Ort::Status(error.c_str(), ORT_INVALID_ARGUMENT);
}

/// The attributes of one node of op `op`; every error it raises starts with "op: ".
class Attributes {
 public:
  Attributes(const OrtKernelInfo* info, const char* op) : info_(info), op_(op) {}

  /// Attribute `name`, or nullopt when the node does not set it. Set with another type (epsilon=1,
  /// an int) it is an error, not silently the default.
  template <class T>
  std::optional<T> get(const char* name) const {
    try {
      return info_.GetAttribute<T>(name);
    } catch (const Ort::Exception&) {
    }
    auto is_set = [&](auto read) {
      try {
        read();
        return true;
      } catch (const Ort::Exception&) {
        return false;
      }
    };
    if (is_set([&] { info_.GetAttribute<int64_t>(name); }) || is_set([&] { info_.GetAttribute<float>(name); }) ||
        is_set([&] { info_.GetAttribute<std::string>(name); }) || is_set([&] { info_.GetAttributes<int64_t>(name); }) ||
        is_set([&] { info_.GetAttributes<float>(name); }))
      fail(std::string(name) + " must be " +
           (std::is_same_v<T, float> ? "a float" : std::is_same_v<T, int64_t> ? "an int" : "a string") +
           "; the node sets it with another attribute type");
    return std::nullopt;
  }

  /// Fails session creation with "op: what".
  [[noreturn]] void fail(const std::string& what) const { normfold::fail(std::string(op_) + ": " + what); }

 private:
  Ort::ConstKernelInfo info_;
  const char* op_;
};

/// Shapes of the node's inputs known at session creation ({-1} where unknown), or nullopt when even
/// X's rank is unknown.
inline std::optional<std::vector<Shape>> static_shapes(const OrtKernelInfo* info) {
  auto known = [&](size_t i) -> std::optional<Shape> {
    try {
      Shape s = Ort::ConstKernelInfo(info).GetInputTypeInfo(i).GetTensorTypeAndShapeInfo().GetShape();
      if (s.empty()) return std::nullopt;
      for (auto& d : s) d = d < 0 ? -1 : d;
      return s;
    } catch (const Ort::Exception&) {
      return std::nullopt;
    }
  };
  if (!known(0)) return std::nullopt;
  std::vector<Shape> shapes;
  for (size_t i = 0; i < Ort::ConstKernelInfo(info).GetInputCount(); ++i) shapes.push_back(known(i).value_or(Shape{-1}));
  return shapes;
}

/// Fails when an input is given as "" (the lite API cannot skip an input in the middle):
/// optional inputs are left out from the end instead.
inline void require_present_inputs(const OrtKernelInfo* info, const char* op) {
  Ort::ConstKernelInfo kernel_info(info);
  for (size_t i = 0; i < kernel_info.GetInputCount(); ++i)
    if (kernel_info.GetInputName(i).empty())
      fail(std::string(op) + ": input " + std::to_string(i) + " is empty (''); leave optional inputs out instead");
}

template <class T>
void add_shape(InputShapes& s, const Ort::Custom::Tensor<T>& t) { s.add(t.Shape()); }
template <class T>
void add_shape(InputShapes& s, const std::optional<const Ort::Custom::Tensor<T>*>& t) {
  if (t) s.add((*t)->Shape());
}

/// The base of every op's kernel. `Attrs` holds the op's attributes: `kName`, a constructor from
/// Attributes that validates them, and `check(InputShapes)` -> "" or what is wrong with the input
/// shapes (unknown dims are not checked). The shapes are checked at session creation where known,
/// and again on every Compute.
template <class Attrs>
struct Kernel {
  static constexpr const char* kName = Attrs::kName;
  Attrs attrs;

  Kernel(const OrtApi*, const OrtKernelInfo* info) : attrs(Attributes(info, kName)) {
    require_present_inputs(info, kName);
    if (const auto shapes = static_shapes(info)) {
      InputShapes in;
      for (const Shape& s : *shapes) in.add(s);
      if (const std::string e = attrs.check(in); !e.empty()) fail(std::string(kName) + ": " + e);
    }
  }

  /// "" or "Op: what is wrong" with the shapes of these inputs, in input order (optional ones as std::optional).
  template <class... Inputs>
  std::string check(const Inputs&... inputs) const {
    InputShapes shapes;
    (add_shape(shapes, inputs), ...);
    const std::string e = attrs.check(shapes);
    return e.empty() ? e : std::string(kName) + ": " + e;
  }
};

/// Shape and type inference of every op: output 0 has input 0's element type and shape. (Set on the C
/// struct: the lite API's ShapeInferContext::SetOutputShape would declare a float output whatever the
/// input type.) A size onnxruntime does not know reaches us as -1 without a name; handed back as is, the
/// -1 would be taken for a size (reshape targets with two -1, MatMuls of "incompatible" sizes), so each
/// such size gets a fresh symbolic name: unknown, and unrelated to any other size. An input of unknown
/// rank comes as rank 0: the output is then left undeclared (declared, it would be a scalar).
inline OrtStatusPtr ORT_API_CALL same_as_input(const OrtCustomOp*, OrtShapeInferContext* ctx) {
  const OrtApi& api = Ort::GetApi();
  OrtTensorTypeAndShapeInfo* input = nullptr;  // owned by the context
  if (OrtStatus* status = api.ShapeInferContext_GetInputTypeShape(ctx, 0, &input)) return status;
  ONNXTensorElementDataType type{};
  size_t rank = 0;
  if (OrtStatus* status = api.GetTensorElementType(input, &type)) return status;
  if (OrtStatus* status = api.GetDimensionsCount(input, &rank)) return status;
  if (rank == 0) return nullptr;  // rank unknown (X is never a scalar): a rank-0 shape would declare one
  std::vector<int64_t> dims(rank);
  std::vector<const char*> names(rank);
  if (OrtStatus* status = api.GetDimensions(input, dims.data(), rank)) return status;
  if (OrtStatus* status = api.GetSymbolicDimensions(input, names.data(), rank)) return status;
  static std::atomic<uint64_t> unknown{0};
  std::vector<std::string> fresh(rank);
  for (size_t i = 0; i < rank; ++i) {
    if (dims[i] < 0 && (names[i] == nullptr || names[i][0] == '\0')) {
      fresh[i] = "normfold_unk_" + std::to_string(unknown.fetch_add(1));
      names[i] = fresh[i].c_str();
    } else if (names[i] == nullptr) {
      names[i] = "";
    }
  }
  OrtTensorTypeAndShapeInfo* output = nullptr;
  if (OrtStatus* status = api.CreateTensorTypeAndShapeInfo(&output)) return status;
  std::unique_ptr<OrtTensorTypeAndShapeInfo, void (*)(OrtTensorTypeAndShapeInfo*)> owned(
      output, [](OrtTensorTypeAndShapeInfo* info) { Ort::GetApi().ReleaseTensorTypeAndShapeInfo(info); });
  if (OrtStatus* status = api.SetTensorElementType(output, type)) return status;
  if (OrtStatus* status = api.SetDimensions(output, dims.data(), rank)) return status;
  if (OrtStatus* status = api.SetSymbolicDimensions(output, names.data(), rank)) return status;
  return api.ShapeInferContext_SetOutputTypeShape(ctx, 0, output);
}

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

using InferShapes = OrtStatusPtr(ORT_API_CALL*)(const OrtCustomOp*, OrtShapeInferContext*);

/// The lite API's op for kernel K on `provider`, run through compute_on_stack.
template <class K>
void add_kernel(OpList& ops, const char* name, const char* provider, InferShapes infer) {
  ops.emplace_back(Ort::Custom::CreateLiteCustomOp<K>(name, provider));
  ops.back()->KernelComputeV2 = compute_on_stack<K>;
  ops.back()->InferOutputShapeFn = infer;
}

/// Registers op `name` (default Op<T, false>::kName): Op<T, false> on the CPU for float, double, float16 and
/// bfloat16, and in the CUDA library also Op<T, true> on CUDA for float, float16 and bfloat16; `infer` gives
/// the output types and shapes.
template <template <class, bool> class Op>
void add_kernels(OpList& ops, const char* name = Op<float, false>::kName, InferShapes infer = same_as_input) {
  constexpr const char* kCpu = "CPUExecutionProvider";
  add_kernel<Op<float, false>>(ops, name, kCpu, infer);
  add_kernel<Op<double, false>>(ops, name, kCpu, infer);
  add_kernel<Op<Ort::Float16_t, false>>(ops, name, kCpu, infer);
  add_kernel<Op<Ort::BFloat16_t, false>>(ops, name, kCpu, infer);
#ifdef NORMFOLD_WITH_CUDA
  constexpr const char* kCudaProvider = "CUDAExecutionProvider";
  add_kernel<Op<float, true>>(ops, name, kCudaProvider, infer);
  add_kernel<Op<Ort::Float16_t, true>>(ops, name, kCudaProvider, infer);
  add_kernel<Op<Ort::BFloat16_t, true>>(ops, name, kCudaProvider, infer);
#endif
}

#ifdef NORMFOLD_WITH_CUDA
/// The CUDA kernels' dtype tag of storage type T.
template <class T>
constexpr cuda::Dtype cuda_dtype() {
  if constexpr (std::is_same_v<T, Ort::Float16_t>) return cuda::Dtype::f16;
  else if constexpr (std::is_same_v<T, Ort::BFloat16_t>) return cuda::Dtype::bf16;
  else return cuda::Dtype::f32;
}

/// The CUDA stream onnxruntime runs this kernel on.
inline void* cuda_stream(OrtKernelContext* ctx) { return Ort::KernelContext(ctx).GetGPUComputeStream(); }
#endif

// Each op's file adds its kernels; register.cc calls these.
void add_group_norm(OpList& ops);
void add_layer_norm(OpList& ops);
void add_rms_norm(OpList& ops);
void add_filter_response_norm(OpList& ops);
void add_weight_norm(OpList& ops);
void add_skip_norms(OpList& ops);  // SkipLayerNorm(Sum), SkipRMSNorm(Sum)
void add_bias_group_norm(OpList& ops);

}  // namespace normfold

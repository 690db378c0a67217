// The entry onnxruntime calls to run a kernel: the op's Compute with its arguments built on the
// stack. onnxruntime's lite API builds each argument on the heap and keeps them in a growing list,
// several allocations per call that cost small tensors (decoding, batch 1) a fifth of the op's time.
#pragma once
#include <cstddef>
#include <exception>
#include <optional>
#include <tuple>
#include <utility>

#include "ort_api.h"

namespace normfold {

/// Where an argument comes from: its input and output index among Compute's tensor arguments.
struct ArgPlace {
  OrtKernelContext* ctx;
  size_t input, output, inputs_given, outputs_given;
};

/// One argument of Compute, as the lite API's signature names it; kInputs / kOutputs: how many
/// inputs / outputs it stands for.
template <class Arg>
struct ComputeArg;

template <>
struct ComputeArg<OrtKernelContext*> {
  static constexpr size_t kInputs = 0, kOutputs = 0;
  OrtKernelContext* ctx;
  explicit ComputeArg(const ArgPlace& p) : ctx(p.ctx) {}
  OrtKernelContext* get() { return ctx; }
};

template <class T>
struct ComputeArg<const Ort::Custom::Tensor<T>&> {
  static constexpr size_t kInputs = 1, kOutputs = 0;
  Ort::Custom::Tensor<T> tensor;
  explicit ComputeArg(const ArgPlace& p) : tensor(p.ctx, p.input, true) {}
  const Ort::Custom::Tensor<T>& get() { return tensor; }
};

/// An optional input: absent when the node leaves it out (optional inputs are left out from the end).
template <class T>
struct ComputeArg<std::optional<const Ort::Custom::Tensor<T>*>> {
  static constexpr size_t kInputs = 1, kOutputs = 0;
  std::optional<Ort::Custom::Tensor<T>> tensor;
  explicit ComputeArg(const ArgPlace& p) {
    if (p.input < p.inputs_given) tensor.emplace(p.ctx, p.input, true);
  }
  std::optional<const Ort::Custom::Tensor<T>*> get() {
    return tensor ? std::optional<const Ort::Custom::Tensor<T>*>(&*tensor) : std::nullopt;
  }
};

template <class T>
struct ComputeArg<Ort::Custom::Tensor<T>&> {
  static constexpr size_t kInputs = 0, kOutputs = 1;
  Ort::Custom::Tensor<T> tensor;
  explicit ComputeArg(const ArgPlace& p) : tensor(p.ctx, p.output, false) {}
  Ort::Custom::Tensor<T>& get() { return tensor; }
};

/// An optional output: absent when the node leaves it out.
template <class T>
struct ComputeArg<std::optional<Ort::Custom::Tensor<T>*>> {
  static constexpr size_t kInputs = 0, kOutputs = 1;
  std::optional<Ort::Custom::Tensor<T>> tensor;
  explicit ComputeArg(const ArgPlace& p) {
    if (p.output < p.outputs_given) tensor.emplace(p.ctx, p.output, false);
  }
  std::optional<Ort::Custom::Tensor<T>*> get() { return tensor ? std::optional(&*tensor) : std::nullopt; }
};

/// The input (kOutputs = false) or output index of argument K: how many such arguments come before it.
template <size_t K, bool kOutputs, class... Args>
constexpr size_t index_of() {
  constexpr size_t counts[] = {(kOutputs ? ComputeArg<Args>::kOutputs : ComputeArg<Args>::kInputs)...};
  size_t n = 0;
  for (size_t i = 0; i < K; ++i) n += counts[i];
  return n;
}

template <class Op, class... Args, size_t... K>
Ort::Status call_compute(Op& op, Ort::Status (Op::*compute)(Args...), OrtKernelContext* ctx, size_t inputs_given,
                         size_t outputs_given, std::index_sequence<K...>) {
  // Each argument is built in place from its own place (a tuple builds its elements in no set order).
  std::tuple<ComputeArg<Args>...> args(
      ArgPlace{ctx, index_of<K, false, Args...>(), index_of<K, true, Args...>(), inputs_given, outputs_given}...);
  return (op.*compute)(std::get<K>(args).get()...);
}

/// KernelComputeV2 of the lite API's OrtLiteCustomStruct<Op>: Op::Compute on the kernel the lite API
/// created, its arguments on the stack; an exception becomes the returned status.
template <class Op>
OrtStatusPtr ORT_API_CALL compute_on_stack(void* op_kernel, OrtKernelContext* ctx) {
  using LiteKernel = typename Ort::Custom::OrtLiteCustomStruct<Op>::Kernel;
  auto* kernel = static_cast<LiteKernel*>(op_kernel);
  try {
    Op& op = *kernel->custom_op_;
    return [&]<class... Args>(Ort::Status (Op::*compute)(Args...)) {
      return call_compute(op, compute, ctx, kernel->num_input_, kernel->num_output_, std::index_sequence_for<Args...>{});
    }(&Op::Compute).release();
  } catch (const Ort::Exception& e) {
    return Ort::GetApi().CreateStatus(e.GetOrtErrorCode(), e.what());
  } catch (const std::exception& e) {
    return Ort::GetApi().CreateStatus(ORT_RUNTIME_EXCEPTION, e.what());
  }
}

}  // namespace normfold

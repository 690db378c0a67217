"""Declared shapes around com.normfold nodes, so onnxruntime infers them right.

The custom-op library infers each op's output as its input 0's type and
shape. onnxruntime hands that shape over with every dimension it does not
know as -1 and writes it back as the *value* -1 (not as unknown), which
poisons everything downstream: a following Mul refuses to broadcast -1 with
the hidden size ("Incompatible dimensions"), a `Shape`-computed Reshape target
gets several -1 ("Target shape may not have multiple -1 dimensions"), a
MatMul finds K = -1 ("Incompatible dimensions for matrix multiplication") and
ORT_ENABLE_ALL fails to merge -1 with the real size ("Error merging shape
info"). Whenever onnxruntime's own inference loses a size (a computed Reshape
target, a Resize, ...) before a fused norm, the model would not load.

`declare_shapes` prevents it: it declares in `value_info` the shape ONNX
shape inference finds for every tensor of a model that has com.normfold nodes
(and for their inputs and outputs even where they are graph inputs/outputs):
known sizes and symbolic names as inferred, every unknown dimension as a fresh
symbolic name of its own (which asserts nothing, but is not -1). onnxruntime
merges these into its own inference (its sizes win over the names), so a
fused op sees sizes or names, never -1, also after ORT_ENABLE_ALL removed a
Cast or Reshape in front of it. A com.normfold op without a function body
stops ONNX inference; its output is declared like its input and inference
runs again.
"""

from __future__ import annotations

import itertools

import onnx
import onnx.shape_inference

from normfold.io.model_io import skeleton
from normfold.ir.convert import all_graphs
from normfold.ops.table import DOMAIN

UNKNOWN_PREFIX = "normfold_dim_"
_ROUNDS = 3  # each round lets inference pass one more com.normfold op that has no function body


def declare_shapes(model: onnx.ModelProto) -> int:
    """Declare in `model` (modified) every tensor shape ONNX inference knows, with
    fresh names for unknown dimensions, when `model` has com.normfold nodes;
    return how many tensors were declared."""
    if not any(n.domain == DOMAIN for g in all_graphs(model.graph) for n in g.node):
        return 0
    fresh = _fresh_names(model)
    done: set[str] = set()
    for _ in range(_ROUNDS):
        known = _inferred_types(model)
        before = len(done)
        for graph in all_graphs(model.graph):
            declared = _declarations(graph)
            interface = {v.name for v in itertools.chain(graph.input, graph.output)}
            custom_ends = {name for n in graph.node if n.domain == DOMAIN for name in (n.input[:1] + n.output[:1])}
            for node in graph.node:
                like_input = node.domain == DOMAIN and node.input and node.output[0] not in known
                sources = {node.output[0]: node.input[0]} if like_input else {}
                for name in itertools.chain(node.input[:1] if node.domain == DOMAIN else [], node.output):
                    if name in done or (name in interface and name not in custom_ends):
                        continue
                    source = declared.get(name) if name in interface else None
                    source = source or known.get(sources.get(name, name))
                    if source is None or not source.type.tensor_type.HasField("shape"):
                        continue
                    _declare(graph, declared, name, _named(source.type.tensor_type, fresh))
                    done.add(name)
        if len(done) == before:
            break
    return len(done)


def _inferred_types(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    """Every tensor type ONNX shape inference knows (any graph), by name; {} if it fails."""
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton(model), strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - onnx raises several types; without inference nothing is declared
        return {}
    return {v.name: v for g in all_graphs(inferred.graph)
            for v in itertools.chain(g.input, g.value_info, g.output)}


def _declarations(graph: onnx.GraphProto) -> dict[str, onnx.ValueInfoProto]:
    return {v.name: v for v in itertools.chain(graph.input, graph.value_info, graph.output)}


def _named(tensor_type: onnx.TypeProto.Tensor, fresh) -> onnx.TypeProto.Tensor:
    """`tensor_type` with every unknown dimension given a fresh symbolic name."""
    named = onnx.TypeProto.Tensor()
    named.CopyFrom(tensor_type)
    for dim in named.shape.dim:
        if not dim.HasField("dim_value") and not dim.dim_param:
            dim.dim_param = next(fresh)
    return named


def _declare(graph: onnx.GraphProto, declared: dict[str, onnx.ValueInfoProto], name: str,
             tensor_type: onnx.TypeProto.Tensor) -> None:
    """Set the declared type of tensor `name` to `tensor_type`, keeping what was
    declared where it says more (a size where `tensor_type` has a name)."""
    entry = declared.get(name)
    if entry is None:
        if any(init.name == name for init in graph.initializer):
            return  # a constant: its shape is its data's
        entry = graph.value_info.add()
        entry.name = name
        declared[name] = entry
    old = entry.type.tensor_type
    if old.HasField("shape") and len(old.shape.dim) == len(tensor_type.shape.dim):
        for new_dim, old_dim in zip(tensor_type.shape.dim, old.shape.dim):
            if old_dim.HasField("dim_value"):
                new_dim.dim_value = old_dim.dim_value
            elif old_dim.dim_param and new_dim.dim_param.startswith(UNKNOWN_PREFIX):
                new_dim.dim_param = old_dim.dim_param
    elem_type = old.elem_type or tensor_type.elem_type
    old.CopyFrom(tensor_type)
    old.elem_type = elem_type


def _fresh_names(model: onnx.ModelProto):
    """Symbolic dimension names not used anywhere in `model`."""
    used = {d.dim_param for g in all_graphs(model.graph)
            for v in itertools.chain(g.input, g.value_info, g.output)
            for d in v.type.tensor_type.shape.dim if d.dim_param}
    return (name for name in (f"{UNKNOWN_PREFIX}{i}" for i in itertools.count()) if name not in used)

"""Portable models: embed the function body of every com.normfold op a model uses.

With the bodies in `ModelProto.functions` the model runs with normfold's
library (onnxruntime binds the fast kernels) and without it (onnxruntime
inlines the bodies; `onnx.reference` runs them), with the same numbers.
"""

from __future__ import annotations

from collections import defaultdict

import onnx
from onnx import helper

from normfold.ir.convert import all_graphs
from normfold.io.model_io import skeleton
from normfold.ops.functions import MIN_OPSET, make_function
from normfold.ops.table import DOMAIN, OPS
from normfold.report import PassReport

FUNCTIONS_IR_VERSION = 8  # model-local functions


def embed_functions(model: onnx.ModelProto) -> PassReport:
    """Add to `model` (in place) one function body per com.normfold op type it
    uses, replacing older normfold bodies; nodes get their attribute defaults
    written out. Returns a report: bodies embedded, and nodes a body cannot serve."""
    report = PassReport("portable")
    nodes = [n for g in all_graphs(model.graph) for n in g.node if n.domain == DOMAIN]
    if not nodes:
        return report
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    types = _element_types(model, nodes)
    by_op: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in nodes:
        by_op[node.op_type].append(node)
    kept = [f for f in model.functions if f.domain != DOMAIN]
    for op, op_nodes in sorted(by_op.items()):
        function = _function_for(op, op_nodes, types, opset, report)
        if function is not None:
            kept.append(function)
            elem = onnx.TensorProto.DataType.Name(_input_type(op_nodes[0], types)).lower()
            report.changed(op, f"{DOMAIN}.{op}", "function body", f"{len(op_nodes)} nodes, {elem}")
    del model.functions[:]
    model.functions.extend(kept)
    model.ir_version = max(model.ir_version, FUNCTIONS_IR_VERSION)
    return report


def embedded(model: onnx.ModelProto) -> list[PassReport]:
    """`embed_functions(model)`'s report in a list, or [] when the model uses no normfold op."""
    report = embed_functions(model)
    return [report] if report.changes or report.skipped else []


def _function_for(op, nodes, types, opset, report) -> onnx.FunctionProto | None:
    """The body serving every node of `op`, or None (each node reported)."""
    def refuse(reason: str, which=nodes) -> None:
        for node in which:
            report.skip(node.name, f"{DOMAIN}.{op}", f"no portable body: {reason}")

    if op not in OPS:
        refuse("normfold has no function body for this op")
        return None
    if opset < MIN_OPSET:
        refuse(f"the model's opset {opset} is below {MIN_OPSET}")
        return None
    signature = OPS[op]
    short = [n for n in nodes if len(n.input) < len(signature.inputs) or not all(n.input)]
    if short:
        refuse(f"an optional input is left out; bodies take all of {', '.join(signature.inputs)}", short)
        return None
    elem_types = {_input_type(n, types) for n in nodes}
    if len(elem_types) != 1 or None in elem_types:
        refuse("its nodes' input element types differ or are unknown")
        return None
    for node in nodes:
        _write_defaults(node, signature.attributes)
    try:
        return make_function(op, elem_types.pop(), opset)
    except ValueError as why:
        refuse(str(why))
        return None


def _input_type(node: onnx.NodeProto, types: dict[str, int]) -> int | None:
    """Element type of `node`'s inputs (all the same for normfold ops), if any is known."""
    return next((types[name] for name in node.input if name in types), None)


def _write_defaults(node: onnx.NodeProto, defaults: dict) -> None:
    """Give `node` every attribute that has a default, explicitly (some runtimes
    do not apply a function's attribute defaults)."""
    present = {a.name for a in node.attribute}
    node.attribute.extend(helper.make_attribute(k, v) for k, v in defaults.items()
                          if v is not None and k not in present)


def _element_types(model: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> dict[str, int]:
    """Element type of every tensor the model declares, with shape inference
    (on a copy without large weights) when a normfold node's input is not declared."""
    types = _declared_types(model)
    if any(_input_type(n, types) is None for n in nodes):
        try:
            inferred = onnx.shape_inference.infer_shapes(skeleton(model))
            types.update(_declared_types(inferred))
        except Exception:  # inference gave up: the undeclared nodes are reported as unknown
            pass
    return types


def _declared_types(model: onnx.ModelProto) -> dict[str, int]:
    types: dict[str, int] = {}
    for g in all_graphs(model.graph):
        for info in (*g.input, *g.output, *g.value_info):
            if info.type.HasField("tensor_type"):
                types[info.name] = info.type.tensor_type.elem_type
        for tensor in g.initializer:
            types[tensor.name] = tensor.data_type
        for node in g.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].type == onnx.AttributeProto.TENSOR:
                types[node.output[0]] = node.attribute[0].t.data_type
    return types


def needs_library_for(model: onnx.ModelProto) -> list[str]:
    """The com.normfold ops `model` uses that carry no function body: without
    normfold's library onnxruntime cannot run them (empty: the model is portable)."""
    functions = {(f.domain, f.name) for f in model.functions}
    custom = sorted({n.op_type for g in all_graphs(model.graph) for n in g.node if n.domain == DOMAIN})
    return [op for op in custom if (DOMAIN, op) not in functions]


def carried_functions(model: onnx.ModelProto) -> list[str]:
    """'domain.name' of every model-local function `model` carries."""
    return [f"{f.domain}.{f.name}" for f in model.functions]

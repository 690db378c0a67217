"""The canonical form the other passes match on; `optimize` makes it first.

    constants   every node whose inputs are all constants (initializers, Constant nodes,
                results folded before it, the Shape of a tensor of static shape) is
                evaluated once and becomes an initializer: the weight side of a model
                (weight standardisation as BatchNormalization over a weight, (1 + w)
                scales, reshaped or expanded γ/β/τ, computed Reshape targets). Float math
                runs in float64 and is rounded once to the node's type, so the folded
                value is at least as exact as the runtime's. Left alone: random and
                quantization ops (QDQ models keep their form), control flow, other
                domains, graph outputs, and a result over FOLD_BYTES bigger than the
                inputs it replaces (an Expand or ConstantOfShape that would bloat the file).
    shapes      inferred again where they were unknown, on the folded graph
    no-ops      Identity, inference Dropout, a Cast to the type its input already has, an
                Expand or Reshape to the shape its input already has: see `cleanup`.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from normfold.ir.convert import refresh_shapes
from normfold.ir.verbs import (NON_DETERMINISTIC, NotConstant, constant_value, detach, evaluate_node, is_observable,
                               is_standard, producer, replace_input, static_shape_value, walk_graphs)
from normfold.passes.cleanup import cleanup
from normfold.report import PassReport

FOLD_BYTES = 1 << 20
_KEEP = NON_DETERMINISTIC | {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "Constant"}
_NO_PROMOTION = {"Cast", "CastLike"}  # their result type is the point


def canonicalize(graph: gs.Graph, exclude: frozenset[str] = frozenset()) -> PassReport:
    """Fold every constant subgraph of `graph` (and its subgraphs) into initializers,
    then drop the no-op nodes; in place. `exclude`: names of nodes to keep as they are."""
    report = PassReport("canonicalize")
    for g, where in walk_graphs(graph):
        for node in list(g.nodes):
            if node.name not in exclude and _foldable(g, node):
                _fold(node, graph.opset, report, where)
        g.cleanup(remove_unused_graph_inputs=False)
    if report.changes:
        refresh_shapes(graph)
    no_ops = cleanup(graph, exclude)
    report.changes += no_ops.changes
    return report


def _foldable(graph: gs.Graph, node: gs.Node) -> bool:
    return bool(node.inputs) and bool(node.outputs) and is_standard(node) and node.op not in _KEEP and \
        not any(isinstance(v, gs.Graph) for v in node.attrs.values()) and \
        not any(is_observable(graph, out) for out in node.outputs)


def _fold(node: gs.Node, opset: int, report: PassReport, where: str) -> None:
    if node.op == "Shape":
        value = static_shape_value(node)
        if value is not None:
            _replace(node, [value], report, where)
        return
    try:
        inputs = [None if not t.name else _known_value(t, opset) for t in node.inputs]
    except NotConstant:
        return
    in_bytes = sum(v.nbytes for v in inputs if v is not None)
    try:
        values = _evaluate(node, inputs, opset)
    except NotConstant:  # onnx.reference cannot run it: it stays, as it was
        return
    out_bytes = sum(v.nbytes for v in values)
    if out_bytes > max(in_bytes, FOLD_BYTES):
        report.skip(node.name, node.op, f"constant, but its {out_bytes} bytes of result would outgrow its inputs", where)
        return
    _replace(node, values, report, where)


def _known_value(tensor: gs.Tensor, opset: int) -> np.ndarray:
    """The value of an initializer or a Constant node's output (what earlier folds made)."""
    node = producer(tensor)
    if isinstance(tensor, gs.Constant) or (node is not None and node.op == "Constant" and not node.inputs):
        return constant_value(tensor, opset)
    raise NotConstant(f"'{tensor.name}' is computed at run time")


def _replace(node: gs.Node, values: list[np.ndarray], report: PassReport, where: str) -> None:
    """Readers of `node`'s outputs read constants holding `values` instead; `node` goes."""
    for out, value in zip(node.outputs, values):
        if out.outputs:
            replace_input(out, gs.Constant(out.name, np.array(value, order="C")))  # keeps 0-d
    detach([node])
    report.changed(node.name, node.op, "initializer", "constant folded", where)


def _evaluate(node: gs.Node, inputs: list, opset: int) -> list[np.ndarray]:
    """`node`'s outputs for constant `inputs`, float math in float64."""
    if node.op == "BatchNormalization":
        return [_batch_norm(node, [v.astype(np.float64) for v in inputs[:5]], opset).astype(inputs[0].dtype)]
    floats = {v.dtype for v in inputs if v is not None and v.dtype in (np.float16, np.float32)}
    if node.op in _NO_PROMOTION or len(floats) != 1:
        return evaluate_node(node, inputs, opset)
    (native,) = floats
    wide = [v.astype(np.float64) if v is not None and v.dtype == native else v for v in inputs]
    return [v.astype(native) if v.dtype == np.float64 else v for v in evaluate_node(node, wide, opset)]


def _batch_norm(node: gs.Node, inputs: list, opset: int) -> np.ndarray:
    """BatchNormalization's Y: over the batch statistics in training mode (training_mode=1,
    or more than one output below opset 14, as onnxruntime reads it), else over the
    given mean and variance."""
    if opset < 9:
        raise NotConstant("BatchNormalization before opset 9 (is_test, spatial) is left as it is")
    x, scale, bias, mean, var = inputs
    training = int(node.attrs.get("training_mode", 0)) == 1 if opset >= 14 else len(node.outputs) > 1
    if training and any(out.outputs for out in node.outputs[1:]):
        raise NotConstant("its running statistics are read")
    axes = tuple(a for a in range(x.ndim) if a != 1)
    if training:
        mean, var = x.mean(axis=axes), x.var(axis=axes)
    shape = [1, -1] + [1] * (x.ndim - 2)
    epsilon = float(node.attrs.get("epsilon", 1e-5))
    return (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + epsilon) * scale.reshape(shape) + \
        bias.reshape(shape)

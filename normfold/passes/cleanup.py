"""Cleanup after the other passes: drop the no-op nodes exporters and folds leave.

    Identity          its readers read the input instead (kept when it renames a graph input
                      to a graph output, the only way ONNX can express that)
    Dropout           in inference (no mask output read, no training_mode input): as Identity
    Cast              to the element type its input already has (x.float() of a float tensor)
    Expand, Reshape   to the static shape its input already has
    dead nodes, unused initializers: removed (onnx-graphsurgeon's cleanup)
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from normfold.report import PassReport

from normfold.ir.verbs import (bypass, detach, is_observable, is_standard, only_consumer_is, producer, replace_input,
                            walk_graphs)


def cleanup(graph: gs.Graph, exclude: frozenset[str] = frozenset()) -> PassReport:
    """Remove Identity and inference Dropout nodes and dead code from `graph` and its
    subgraphs; `exclude`: names of nodes to keep."""
    report = PassReport("cleanup")
    for g, where in walk_graphs(graph):
        for node in list(g.nodes):
            reason = None if node.name in exclude else _no_op(g, node)
            if reason is None:
                continue
            source, result = node.inputs[0], node.outputs[0]
            if not is_observable(g, result):
                replace_input(result, source)
                detach([node])
            elif only_consumer_is(g, source, node) and producer(source) is not None:
                bypass(node, source)  # the producer now writes the graph output itself
            else:
                report.skip(node.name, node.op, "its output is a graph output under another name than its "
                            "input, which is itself a graph input, output or constant: ONNX needs the node", where)
                continue
            report.changed(node.name, node.op, "removed", reason, where)
        g.cleanup(remove_unused_graph_inputs=False)
    return report


def _no_op(graph: gs.Graph, node: gs.Node) -> str | None:
    """Why `node` computes its first input unchanged, or None."""
    if not is_standard(node) or not node.inputs or not node.outputs:
        return None
    if node.op == "Identity":
        return "identity"
    extra_outputs_unused = all(not o.outputs and not is_observable(graph, o) for o in node.outputs[1:])
    if node.op == "Dropout" and len(node.inputs) < 3 and extra_outputs_unused:
        return "inference dropout"
    if node.op == "Cast" and _same_type(node.inputs[0], int(node.attrs.get("to", 0))):
        return "cast to its own type"
    if node.op in ("Expand", "Reshape") and _static(node.inputs[0]) is not None and \
            _static(node.inputs[0]) == _static(node.outputs[0]):
        return f"{node.op.lower()} to its own shape"
    return None


def _same_type(tensor: gs.Tensor, to: int) -> bool:
    """Whether `tensor` is known to have ONNX element type `to`."""
    if tensor.dtype is None or not to:
        return False
    try:
        return np.dtype(tensor.dtype) == onnx.helper.tensor_dtype_to_np_dtype(to)
    except (TypeError, KeyError, ValueError):
        return False


def _static(tensor: gs.Tensor) -> tuple[int, ...] | None:
    shape = tensor.shape
    return tuple(shape) if shape is not None and all(isinstance(d, int) and d >= 0 for d in shape) else None

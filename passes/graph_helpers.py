"""The few verbs every pass uses over an onnx-graphsurgeon graph: producer of,
consumers of, constant value of, new constant, rewire, subgraphs of."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import onnx
import onnx.reference
import onnx_graphsurgeon as gs
from onnx import numpy_helper
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter
from onnx_graphsurgeon.ir.tensor import LazyValues

gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR

# Ops whose output is not a function of their inputs: never evaluated as constants.
_NON_DETERMINISTIC = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli"}
_MAX_CONSTANT_SUBGRAPH = 64  # nodes; bigger constant subgraphs are not evaluated


class NotConstant(Exception):
    """A tensor a pass needs as a constant depends on a graph input or a random op."""


def producer(tensor: gs.Tensor) -> gs.Node | None:
    """The node that computes `tensor`, or None for graph inputs and constants."""
    return tensor.inputs[0] if tensor.inputs else None


def consumers(tensor: gs.Tensor) -> list[gs.Node]:
    """The nodes that read `tensor` (in this graph and in nested subgraphs)."""
    return list(tensor.outputs)


def is_observable(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    """Whether `tensor` is a graph output (its value is visible outside the graph)."""
    return any(out is tensor for out in graph.outputs)


def is_standard(node: gs.Node) -> bool:
    """Whether `node` is in the default ONNX domain."""
    return node.domain in (None, "", "ai.onnx")


def only_consumer_is(graph: gs.Graph, tensor: gs.Tensor, node: gs.Node) -> bool:
    """Whether `node` is the sole reader of `tensor` and `tensor` is not a graph output."""
    readers = consumers(tensor)
    return len(readers) == 1 and readers[0] is node and not is_observable(graph, tensor)


def constant_value(tensor: gs.Tensor | None, opset: int) -> np.ndarray:
    """The value of `tensor` if it is computable from constants alone.

    Accepts initializers, Constant-node outputs and small subgraphs over
    constants (Identity, Cast, Reshape, Expand, ... of initializers, as the
    exporters sometimes emit), evaluated at the graph's `opset`; raises
    NotConstant otherwise.
    """
    if tensor is None:
        raise NotConstant("missing")
    if isinstance(tensor, gs.Constant):
        return _array(tensor)
    node = producer(tensor)
    if node is None:
        raise NotConstant(f"'{tensor.name}' is a graph input")
    if node.op == "Constant" and not node.inputs:
        return _constant_node_value(node)
    return _evaluate(tensor, opset)


def _array(constant: gs.Constant) -> np.ndarray:
    if isinstance(constant._values, LazyValues):  # read the TensorProto directly (keeps bf16 exact)
        return numpy_helper.to_array(constant._values.tensor)
    return np.asarray(constant.values)


def _constant_node_value(node: gs.Node) -> np.ndarray:
    attrs = node.attrs
    if "value" in attrs:
        return _array(attrs["value"])
    for key, dtype in (("value_float", np.float32), ("value_floats", np.float32),
                       ("value_int", np.int64), ("value_ints", np.int64)):
        if key in attrs:
            return np.asarray(attrs[key], dtype=dtype)
    raise NotConstant(f"Constant node '{node.name}' has an unsupported value attribute")


def _evaluate(tensor: gs.Variable, opset: int) -> np.ndarray:
    """Run the constant-only subgraph that computes `tensor` with onnx.reference."""
    nodes: list[gs.Node] = []
    inits: dict[str, gs.Constant] = {}
    stack, seen = [tensor], set()
    while stack:
        t = stack.pop()
        if t.name in seen:
            continue
        seen.add(t.name)
        if isinstance(t, gs.Constant):
            inits[t.name] = t
            continue
        node = producer(t)
        if node is None:
            raise NotConstant(f"'{tensor.name}' depends on graph input '{t.name}'")
        if node.op in _NON_DETERMINISTIC or not is_standard(node):
            raise NotConstant(f"'{tensor.name}' depends on {node.op} node '{node.name}'")
        if any(isinstance(v, gs.Graph) for v in node.attrs.values()):
            raise NotConstant(f"'{tensor.name}' depends on control flow node '{node.name}'")
        if node not in nodes:
            nodes.append(node)
        if len(nodes) > _MAX_CONSTANT_SUBGRAPH:
            raise NotConstant(f"'{tensor.name}' is computed by a large subgraph")
        stack.extend(i for i in node.inputs if i.name)
    graph = onnx.helper.make_graph(
        [OnnxExporter.export_node(n) for n in reversed(nodes)],
        "constant",
        inputs=[],
        outputs=[onnx.helper.make_empty_tensor_value_info(tensor.name)],
        initializer=[numpy_helper.from_array(_array(c), c.name) for c in inits.values()],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)], ir_version=8)
    try:
        (value,) = onnx.reference.ReferenceEvaluator(model).run(None, {})
    except Exception as exc:  # the reference evaluator's errors are of many types
        raise NotConstant(f"'{tensor.name}' could not be evaluated ({type(exc).__name__})") from exc
    return np.asarray(value)


class NameScope:
    """Hands out tensor names unused anywhere in a graph and its subgraphs."""

    def __init__(self, graph: gs.Graph):
        self.taken: set[str] = set()
        self._collect(graph)

    def _collect(self, graph: gs.Graph) -> None:
        self.taken.update(graph.tensors().keys())
        for sub in subgraphs(graph):
            self._collect(sub)

    def fresh(self, base: str) -> str:
        """`base`, or `base_N` for the first N that is free; reserved from now on."""
        name, n = base, 0
        while name in self.taken:
            n += 1
            name = f"{base}_{n}"
        self.taken.add(name)
        return name

    def constant(self, like: str, values: np.ndarray) -> gs.Constant:
        """A new constant holding `values`, named after the tensor `like`."""
        return gs.Constant(self.fresh(f"{like}_folded"), np.ascontiguousarray(values))

    def variable(self, like: str, dtype=None, shape=None) -> gs.Variable:
        """A new intermediate tensor named after `like`."""
        return gs.Variable(self.fresh(like), dtype=dtype, shape=shape)


def bypass(node: gs.Node, replacement: gs.Tensor) -> None:
    """Remove single-output `node`: whoever produced `replacement` now produces
    `node`'s output instead (the output keeps its name)."""
    out = node.outputs[0]
    node.outputs.clear()
    node.inputs.clear()
    replacement_producer = producer(replacement)
    index = replacement_producer.outputs.index(replacement)
    replacement_producer.outputs[index] = out


def subgraphs(graph: gs.Graph) -> Iterator[gs.Graph]:
    """Graphs nested in `graph`'s nodes (If branches, Loop and Scan bodies)."""
    for node in graph.nodes:
        for value in node.attrs.values():
            if isinstance(value, gs.Graph):
                yield value


def int_attr(node: gs.Node, name: str, default: int) -> int:
    """Integer attribute of `node`, or `default` when absent."""
    return int(node.attrs.get(name, default))


def float_attr(node: gs.Node, name: str, default: float) -> float:
    """Float attribute of `node`, or `default` when absent."""
    return float(node.attrs.get(name, default))

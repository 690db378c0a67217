"""The few verbs every pass uses over an onnx-graphsurgeon graph: producer of,
consumers of, constant value of, new constant, rewire, subgraphs of."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import onnx
import onnx.reference
import onnx_graphsurgeon as gs
from onnx import numpy_helper
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter
from onnx_graphsurgeon.ir.tensor import LazyValues

gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR

# Ops whose output is not a function of their inputs: never evaluated as constants.
NON_DETERMINISTIC = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli"}
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


def reads_only_type(node: gs.Node, tensor: gs.Tensor) -> bool:
    """Whether `node` reads `tensor` only for its element type (CastLike's target)."""
    return node.op == "CastLike" and is_standard(node) and node.inputs[0] is not tensor and \
        any(i is tensor for i in node.inputs)


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


def is_constant(tensor: gs.Tensor, opset: int) -> bool:
    """Whether `tensor` is computable from constants alone (see `constant_value`)."""
    try:
        constant_value(tensor, opset)
    except NotConstant:
        return False
    return True


def _array(constant: gs.Constant) -> np.ndarray:
    values = constant._values
    if isinstance(values, DeferredValues):
        return values.load()
    if isinstance(values, LazyValues):  # read the TensorProto directly (keeps bf16 exact)
        return numpy_helper.to_array(values.tensor)
    return np.asarray(values)


class DeferredValues(LazyValues):
    """Values of a new constant, computed from other constants when they are
    exported, so a pass over a big model holds no second copy of the weights
    it rewrites."""

    def __init__(self, compute: Callable[[], np.ndarray], shape, dtype):
        self._compute = compute
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.nbytes = int(np.prod(self.shape)) * self.dtype.itemsize

    def load(self) -> np.ndarray:
        values = self._compute().astype(self.dtype, copy=False)
        if values.shape != self.shape:
            raise AssertionError(f"deferred constant computed shape {values.shape}, expected {self.shape}")
        return values

    @property
    def tensor(self) -> onnx.TensorProto:
        return numpy_helper.from_array(self.load())


@dataclass
class ConstantRef:
    """A constant input known by shape and dtype, loaded only on `load()`."""

    shape: tuple
    dtype: np.dtype
    load: Callable[[], np.ndarray]

    @property
    def ndim(self) -> int:
        return len(self.shape)


def constant_ref(tensor: gs.Tensor, opset: int) -> ConstantRef:
    """Like `constant_value`, but initializers are not read until `load()`."""
    if isinstance(tensor, gs.Constant) and isinstance(tensor._values, LazyValues):
        values = tensor._values
        dtype = values.dtype
        if not isinstance(dtype, np.dtype):
            dtype = onnx.helper.tensor_dtype_to_np_dtype(int(dtype)) if isinstance(dtype, int) else np.dtype(dtype)
        return ConstantRef(tuple(values.shape), dtype, lambda: _array(tensor))
    value = constant_value(tensor, opset)
    return ConstantRef(value.shape, value.dtype, lambda: value)


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
    """Run the constant-only subgraph that computes `tensor` with onnx.reference.

    Inputs a node reads only for their static type or shape count as constants
    too: `CastLike(v, like)` becomes `Cast(v, to=type of like)`, and `Shape(t)`
    of a tensor whose shape is fully known is that shape.
    """
    _check_inputs_constant(tensor)
    nodes: dict[int, onnx.NodeProto] = {}
    leaves: dict[str, np.ndarray] = {}
    stack = [tensor]
    while stack:
        t = stack.pop()
        if t.name in leaves or any(t.name in n.output for n in nodes.values()):
            continue
        if isinstance(t, gs.Constant):
            leaves[t.name] = _array(t)
            continue
        node = producer(t)
        if node is None:
            raise NotConstant(f"'{tensor.name}' depends on graph input '{t.name}'")
        if node.op in NON_DETERMINISTIC or not is_standard(node):
            raise NotConstant(f"'{tensor.name}' depends on {node.op} node '{node.name}'")
        if any(isinstance(v, gs.Graph) for v in node.attrs.values()):
            raise NotConstant(f"'{tensor.name}' depends on control flow node '{node.name}'")
        if node.op == "Constant" and not node.inputs:
            leaves[t.name] = _constant_node_value(node)
            continue
        if node.op == "Shape" and _static_shape(node.inputs[0]) is not None:
            leaves[t.name] = _shape_value(node)
            continue
        proto = _node_proto(node)
        reads = [i for i in node.inputs if i.name]
        if node.op == "CastLike" and _static_dtype(node.inputs[1]) is not None:
            proto = onnx.helper.make_node("Cast", [proto.input[0]], list(proto.output), to=_static_dtype(node.inputs[1]))
            reads = reads[:1]
        nodes[id(node)] = proto
        if len(nodes) > _MAX_CONSTANT_SUBGRAPH:
            raise NotConstant(f"'{tensor.name}' is computed by a large subgraph")
        stack.extend(reads)
    (value,) = _run_reference(_in_order(list(nodes.values()), set(leaves)), leaves, [tensor.name], opset)
    return value


def evaluate_node(node: gs.Node, inputs: list[np.ndarray | None], opset: int) -> list[np.ndarray]:
    """The outputs of standard-domain `node` for the input values `inputs` (None for an
    omitted optional input), computed by onnx.reference at `opset`; raises NotConstant
    when it cannot be evaluated."""
    proto = _node_proto(node)
    names = [f"in{i}" if value is not None else "" for i, value in enumerate(inputs)]
    del proto.input[:]
    proto.input.extend(names)
    leaves = {name: value for name, value in zip(names, inputs) if value is not None}
    return _run_reference([proto], leaves, [o for o in proto.output], opset)


def _node_proto(node: gs.Node) -> onnx.NodeProto:
    with names_kept(v._values.tensor for v in node.attrs.values()
                    if isinstance(v, gs.Constant) and type(v._values) is LazyValues):
        return OnnxExporter.export_node(node)


def _run_reference(nodes: list[onnx.NodeProto], leaves: dict[str, np.ndarray], outputs: list[str],
                   opset: int) -> list[np.ndarray]:
    """Run `nodes` (in order) over the constant `leaves` with onnx.reference; the `outputs`."""
    graph = onnx.helper.make_graph(
        nodes,
        "constant",
        inputs=[],
        outputs=[onnx.helper.make_empty_tensor_value_info(name) for name in outputs],
        initializer=[numpy_helper.from_array(np.asarray(v), name) for name, v in leaves.items()],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)], ir_version=8)
    try:
        values = onnx.reference.ReferenceEvaluator(model).run(None, {})
    except Exception as exc:  # the reference evaluator's errors are of many types
        raise NotConstant(f"'{outputs[0]}' could not be evaluated ({type(exc).__name__})") from exc
    return [np.asarray(v) for v in values]


def _check_inputs_constant(tensor: gs.Variable) -> None:
    """Raise NotConstant early, without exporting any node, when `tensor` depends
    on a graph input or on more than _MAX_CONSTANT_SUBGRAPH nodes (a cheap walk
    that spares `_evaluate` its work for the many tensors that are activations)."""
    seen: set[int] = set()
    stack = [tensor]
    while stack:
        node = producer(stack.pop())
        if node is None or id(node) in seen or node.op in ("Shape", "Constant"):  # Shape: see _evaluate
            continue
        seen.add(id(node))
        if len(seen) > _MAX_CONSTANT_SUBGRAPH:
            raise NotConstant(f"'{tensor.name}' is computed by a large subgraph")
        reads = node.inputs[:1] if node.op == "CastLike" else node.inputs
        for t in reads:
            if t.name and not isinstance(t, gs.Constant) and producer(t) is None:
                raise NotConstant(f"'{tensor.name}' depends on graph input '{t.name}'")
            stack.append(t)


@contextmanager
def names_kept(protos: Iterable[onnx.TensorProto]):
    """Put back the names of `protos` afterwards: graphsurgeon's exporter renames
    the TensorProtos a graph was imported from (the caller's model) in place."""
    saved = [(proto, proto.name if proto.HasField("name") else None) for proto in protos]
    try:
        yield
    finally:
        for proto, name in saved:
            if name is None:
                proto.ClearField("name")
            else:
                proto.name = name


def _in_order(nodes: list[onnx.NodeProto], available: set[str]) -> list[onnx.NodeProto]:
    """`nodes` in an order where each node's inputs are computed before it."""
    ordered, pending = [], list(nodes)
    while pending:
        ready = [n for n in pending if all(not i or i in available for i in n.input)]
        if not ready:
            raise NotConstant("constant subgraph has a cycle")
        for node in ready:
            ordered.append(node)
            available.update(node.output)
            pending.remove(node)
    return ordered


def _static_shape(t: gs.Tensor) -> tuple[int, ...] | None:
    shape = t.shape
    if shape is None or not all(isinstance(d, int) for d in shape):
        return None
    return tuple(shape)


def _static_dtype(t: gs.Tensor) -> int | None:
    if t.dtype is None:
        return None
    if isinstance(t.dtype, int):
        return t.dtype
    return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(t.dtype))


def static_shape_value(shape_node: gs.Node) -> np.ndarray | None:
    """The value of a Shape node of a tensor whose shape is fully known, else None."""
    return _shape_value(shape_node) if _static_shape(shape_node.inputs[0]) is not None else None


def _shape_value(shape_node: gs.Node) -> np.ndarray:
    dims = _static_shape(shape_node.inputs[0])
    start = int(shape_node.attrs.get("start", 0))
    end = shape_node.attrs.get("end")
    return np.array(dims[start:None if end is None else int(end)], dtype=np.int64)


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

    def deferred_constant(self, like: str, compute: Callable[[], np.ndarray], shape, dtype) -> gs.Constant:
        """A new constant named after `like` whose values `compute()` gives when exported."""
        return gs.Constant(self.fresh(f"{like}_folded"), DeferredValues(compute, shape, dtype))

    def variable(self, like: str, dtype=None, shape=None) -> gs.Variable:
        """A new intermediate tensor named after `like`."""
        return gs.Variable(self.fresh(like), dtype=dtype, shape=shape)


def detach(nodes: Iterable[gs.Node]) -> None:
    """Disconnect `nodes` from every tensor; the next cleanup() drops them."""
    for node in nodes:
        node.inputs.clear()
        node.outputs.clear()


def bypass(node: gs.Node, replacement: gs.Tensor) -> None:
    """Remove single-output `node`: whoever produced `replacement` now produces
    `node`'s output instead (the output keeps its name)."""
    out = node.outputs[0]
    node.outputs.clear()
    node.inputs.clear()
    replacement_producer = producer(replacement)
    index = replacement_producer.outputs.index(replacement)
    replacement_producer.outputs[index] = out


def replace_input(tensor: gs.Tensor, replacement: gs.Tensor) -> None:
    """Every node reading `tensor` reads `replacement` instead."""
    for reader in consumers(tensor):
        for i, t in enumerate(reader.inputs):
            if t is tensor:
                reader.inputs[i] = replacement


def subgraphs(graph: gs.Graph) -> Iterator[gs.Graph]:
    """Graphs nested in `graph`'s nodes (If branches, Loop and Scan bodies)."""
    for node in graph.nodes:
        for value in node.attrs.values():
            if isinstance(value, gs.Graph):
                yield value


def walk_graphs(graph: gs.Graph, where: str = "") -> Iterator[tuple[gs.Graph, str]]:
    """`graph` and every graph nested in it, innermost first, each with its
    path of graph names ('' for the main graph)."""
    for sub in list(subgraphs(graph)):
        yield from walk_graphs(sub, f"{where}/{sub.name}" if where else sub.name)
    yield graph, where


def int_attr(node: gs.Node, name: str, default: int) -> int:
    """Integer attribute of `node`, or `default` when absent."""
    return int(node.attrs.get(name, default))


def float_attr(node: gs.Node, name: str, default: float) -> float:
    """Float attribute of `node`, or `default` when absent."""
    return float(node.attrs.get(name, default))

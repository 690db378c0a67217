"""Exact matching of normalization subgraphs, shared by the fuse matchers.

A `Match` walks a graph from an anchor node, collecting the nodes of the
candidate subgraph, and raises `NoMatch` with the reason the moment anything
differs from the expected form: an op, a constant (axes, epsilon, exponent 2,
shapes), a broadcast layout, or an intermediate tensor read outside the
subgraph. Nothing is changed until the whole pattern matched.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from normfold.ir.verbs import (
    NotConstant,
    constant_value,
    consumers,
    is_observable,
    is_standard,
    producer,
    reads_only_type,
)


class NoMatch(Exception):
    """The subgraph is not the expected pattern; the message says why.

    `candidate` is False when the anchor is simply something else (not worth
    reporting), True when it looked like a normalization but differed.
    """

    def __init__(self, reason: str, candidate: bool = True):
        super().__init__(reason)
        self.candidate = candidate


@dataclass
class Match:
    """Nodes collected so far for one candidate subgraph of `graph`."""

    graph: gs.Graph
    opset: int
    nodes: list[gs.Node] = field(default_factory=list)

    def take(self, node: gs.Node) -> gs.Node:
        """Add `node` to the subgraph (once)."""
        if not any(n is node for n in self.nodes):
            self.nodes.append(node)
        return node

    def producer(self, tensor: gs.Tensor, *ops: str) -> gs.Node:
        """The standard-domain node computing `tensor`, which must be one of `ops`; taken."""
        node = producer(tensor)
        if node is None or node.op not in ops or not is_standard(node):
            found = "a graph input or constant" if node is None else f"{node.op} '{node.name}'"
            raise NoMatch(f"'{tensor.name}' comes from {found}, not {'/'.join(ops)}")
        return self.take(node)

    def next(self, tensor: gs.Tensor, *ops: str) -> gs.Node:
        """The only reader of `tensor`, which must be one of `ops`; taken."""
        if is_observable(self.graph, tensor):
            raise NoMatch(f"intermediate '{tensor.name}' is a graph output")
        readers = value_readers(tensor)
        if len(readers) != 1:
            raise NoMatch(f"intermediate '{tensor.name}' is read by {len(readers)} nodes, expected one {'/'.join(ops)}")
        node = readers[0]
        if node.op not in ops or not is_standard(node):
            raise NoMatch(f"'{tensor.name}' is read by {node.op} '{node.name}', not {'/'.join(ops)}")
        return self.take(node)

    def sole_consumer(self, tensor: gs.Tensor, *ops: str) -> gs.Node | None:
        """The only reader of `tensor` if it is one of `ops` (not taken), else None."""
        readers = value_readers(tensor)
        if len(readers) != 1 or is_observable(self.graph, tensor):
            return None
        node = readers[0]
        return node if node.op in ops and is_standard(node) else None

    def same_value(self, a: gs.Tensor, b: gs.Tensor) -> bool:
        """Whether `a` is `b`, or a recomputation of it by an identical node (exporters
        without optimization compute `x - mean` twice); such a twin node is taken."""
        if a is b:
            return True
        twin, node = producer(a), producer(b)
        if twin is None or node is None or twin.op != node.op or twin.attrs != node.attrs or \
                len(twin.inputs) != len(node.inputs) or any(i is not j for i, j in zip(twin.inputs, node.inputs)):
            return False
        self.take(twin)
        return True

    def constant(self, tensor: gs.Tensor | None, what: str) -> np.ndarray:
        """The value of `tensor`, which must be computable from constants."""
        try:
            return constant_value(tensor, self.opset)
        except NotConstant as why:
            raise NoMatch(f"{what} is not a constant ({why})") from None

    def scalar(self, tensor: gs.Tensor, what: str) -> float:
        """The value of a one-element constant `tensor`."""
        value = self.constant(tensor, what)
        if value.size != 1:
            raise NoMatch(f"{what} has shape {list(value.shape)}, expected a single value")
        return float(value.reshape(()))

    def expect_scalar(self, tensor: gs.Tensor, expected: float, what: str) -> None:
        """`tensor` must be the constant `expected`."""
        value = self.scalar(tensor, what)
        if value != expected:
            raise NoMatch(f"{what} is {value:g}, expected {expected:g}")

    def check_private(self, keep: gs.Tensor) -> None:
        """Every tensor computed inside the subgraph except `keep` must be read only
        inside it and must not be a graph output (else removing it changes the model)."""
        inside = {id(n) for n in self.nodes}
        for node in self.nodes:
            for out in node.outputs:
                if out is keep:
                    continue
                if is_observable(self.graph, out):
                    raise NoMatch(f"intermediate '{out.name}' is a graph output")
                outside = [r for r in value_readers(out) if id(r) not in inside]
                if outside:
                    raise NoMatch(f"intermediate '{out.name}' is also read by {outside[0].op} '{outside[0].name}'")


def value_readers(tensor: gs.Tensor) -> list[gs.Node]:
    """The nodes reading `tensor`'s values: CastLike nodes that read it only as
    their type target are left out (a fused op's input has the same type; see
    `retarget_type_readers`)."""
    return [r for r in consumers(tensor) if not reads_only_type(r, tensor)]


def retarget_type_readers(nodes: list[gs.Node], like: gs.Tensor) -> None:
    """CastLike nodes that take their type from an output of `nodes` (about to be
    removed) take it from `like`, a tensor of the same element type."""
    for node in nodes:
        for out in node.outputs:
            for reader in consumers(out):
                if reads_only_type(reader, out):
                    reader.inputs[1] = like


LOW_PRECISION = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
WIDE = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE)


def has_type(tensor: gs.Tensor, onnx_type: int) -> bool:
    """Whether `tensor` is known to have ONNX element type `onnx_type`."""
    if tensor.dtype is None:
        return False
    if isinstance(tensor.dtype, int):
        return tensor.dtype == onnx_type
    try:
        return np.dtype(tensor.dtype) == np.dtype(onnx.helper.tensor_dtype_to_np_dtype(onnx_type))
    except (TypeError, KeyError, ValueError):
        return False


def low_precision_type(tensor: gs.Tensor) -> int | None:
    """float16 or bfloat16 (as an ONNX type) if `tensor` is known to be one, else None."""
    return next((t for t in LOW_PRECISION if has_type(tensor, t)), None)


def up_cast(tensor: gs.Tensor) -> gs.Node | None:
    """The Cast computing `tensor` from a float16/bfloat16 tensor, to float32 or float64
    (TorchScript casts to ε's type, double); else None."""
    node = producer(tensor)
    if node is None or node.op != "Cast" or not is_standard(node):
        return None
    to = int(node.attrs.get("to", 0))
    return node if to in WIDE and low_precision_type(node.inputs[0]) is not None else None


def down_cast(m: Match, tensor: gs.Tensor, onnx_type: int) -> gs.Node | None:
    """The only reader of `tensor` if it is a Cast of it to `onnx_type` (not taken), else None."""
    node = m.sole_consumer(tensor, "Cast")
    return node if node is not None and int(node.attrs.get("to", 0)) == onnx_type else None


def other_input(node: gs.Node, tensor: gs.Tensor) -> gs.Tensor:
    """The input of binary `node` that is not `tensor` (Mul/Add in either order)."""
    a, b = node.inputs[0], node.inputs[1]
    if a is tensor and b is not tensor:
        return b
    if b is tensor and a is not tensor:
        return a
    raise NoMatch(f"{node.op} '{node.name}' does not read '{tensor.name}' exactly once")


def rank_of(tensor: gs.Tensor) -> int | None:
    """Rank of `tensor` if known."""
    return None if tensor.shape is None else len(tensor.shape)


def static_dim(tensor: gs.Tensor, axis: int) -> int | None:
    """Size of `axis` of `tensor` if known as a number."""
    if tensor.shape is None or not -len(tensor.shape) <= axis < len(tensor.shape):
        return None
    d = tensor.shape[axis]
    return d if isinstance(d, int) and d >= 0 else None


def reduce_axes(m: Match, node: gs.Node, rank: int) -> tuple[int, ...]:
    """The sorted non-negative axes a ReduceMean with keepdims=1 reduces over."""
    if int(node.attrs.get("keepdims", 1)) != 1:
        raise NoMatch(f"ReduceMean '{node.name}' has keepdims=0")
    if "axes" in node.attrs:
        axes = node.attrs["axes"]
    elif len(node.inputs) > 1 and node.inputs[1].name:
        axes = m.constant(node.inputs[1], f"axes of ReduceMean '{node.name}'").reshape(-1).tolist()
    elif int(node.attrs.get("noop_with_empty_axes", 0)):
        raise NoMatch(f"ReduceMean '{node.name}' reduces nothing")
    else:
        axes = list(range(rank))
    normalized = sorted({int(a) + rank if int(a) < 0 else int(a) for a in axes})
    if not normalized or normalized[0] < 0 or normalized[-1] >= rank:
        raise NoMatch(f"ReduceMean '{node.name}' axes {list(axes)} are out of range for rank {rank}")
    return tuple(normalized)


def per_axes_values(value: np.ndarray, x: gs.Tensor, axes: tuple[int, ...], what: str) -> np.ndarray:
    """`value`, broadcast against `x` (rank r) as a Mul/Add operand would be,
    reduced to the block of dims `axes` (contiguous): shape `x.shape[axes]`.

    Raises NoMatch when `value` varies along another axis or would change the
    result's shape."""
    rank = rank_of(x)
    if rank is None or value.ndim > rank:
        raise NoMatch(f"{what} of shape {list(value.shape)} does not broadcast onto the input")
    full = value.reshape((1,) * (rank - value.ndim) + value.shape)
    target = []
    for axis in range(rank):
        if axis in axes:
            size = static_dim(x, axis)
            if size is None:
                raise NoMatch(f"size of axis {axis} of '{x.name}' is unknown")
            if full.shape[axis] not in (1, size):
                raise NoMatch(f"{what} of shape {list(value.shape)} does not match axis {axis} of size {size}")
            target.append(size)
        elif full.shape[axis] != 1:
            raise NoMatch(f"{what} of shape {list(value.shape)} varies along axis {axis}, "
                          f"not only along {list(axes)}")
    block = full.reshape([full.shape[a] for a in axes])
    return np.broadcast_to(block, target).copy()


@dataclass
class Affine:
    """`y = x̂ * scale + bias` applied after a normalization (either may be absent).
    `left` names the Mul/Add that follow but could not be absorbed, and why."""

    scale: np.ndarray | None
    bias: np.ndarray | None
    out: gs.Tensor
    nodes: list[gs.Node]
    left: list[tuple[gs.Node, str]] = field(default_factory=list)


def match_affine(m: Match, normalized: gs.Tensor, x: gs.Tensor, axes: tuple[int, ...], with_bias: bool = True) -> Affine:
    """The constant Mul(γ) and then Add(β) following `normalized`, each optional,
    with γ/β varying only along `axes` of `x`. A Mul/Add whose other operand is
    not constant or laid out differently ends the affine part: it stays in the
    graph after the fused op and is listed in `left`."""
    affine = Affine(None, None, normalized, [])
    steps = [("Mul", "scale"), ("Add", "bias")] if with_bias else [("Mul", "scale")]
    for op, what in steps:
        node = m.sole_consumer(affine.out, op)
        if node is None:
            continue
        try:
            value = m.constant(other_input(node, affine.out), f"{what} of {op} '{node.name}'")
            value = per_axes_values(value, x, axes, what)
        except NoMatch as why:
            affine.left.append((node, str(why)))
            break
        setattr(affine, what, value)
        affine.out = node.outputs[0]
        affine.nodes.append(node)
    return affine


def same_dims(a: gs.Tensor, b: gs.Tensor) -> bool:
    """Whether `a` and `b` are known to have the same shape (equal numbers or symbols)."""
    if a.shape is None or b.shape is None or len(a.shape) != len(b.shape):
        return False
    return all(d is not None and d == e and (not isinstance(d, int) or d >= 0) for d, e in zip(a.shape, b.shape))

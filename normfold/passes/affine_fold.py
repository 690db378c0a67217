"""Fold a per-channel affine map `y = s ⊙ x + t` into neighbouring linear layers.

    backward:  Conv | ConvTranspose | Gemm | MatMul(+Add)  ->  affine     =>  layer'
    forward:   affine  ->  Conv (unpadded or t = 0) | ConvTranspose (t = 0) | Gemm | MatMul  =>  layer'
    partial:   affine  ->  padded Conv | ConvTranspose ...  =>  Add(t / s) -> Conv(W·s) ...

The affine map is computed by a chain of nodes (one BN, or Mul/Div/Add/Sub by
constants) from tensor x to tensor y; `fold_bn` and `fold_affine` find the
chains, this module checks where a fold is exact and rewires. The arithmetic
is in `affine_math`. Shared weights are never changed under another reader:
every folded weight is a new constant.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from normfold.ir.verbs import (
    ConstantRef,
    NameScope,
    NotConstant,
    constant_ref,
    consumers,
    detach,
    float_attr,
    int_attr,
    is_observable,
    is_standard,
    only_consumer_is,
    producer,
    reads_only_type,
    replace_input,
)
from normfold.passes import affine_math
from normfold.passes.batchnorm import Skip


class OnlyScaleFolds(Skip):
    """A consumer takes the map's scale exactly but not its shift (a Conv that
    zero-pads its input, a ConvTranspose)."""


@dataclass
class Affine:
    """`y = s ⊙ x + t` along one channel axis, computed by `nodes` (a chain from x to y).

    s, t: float64, one value per channel or size 1 (scalar).
    axis: the channel axis, >= 0 counted from the start (BN: 1), < 0 from the
    end (as a broadcast constant places it); None when s and t are scalars.
    """

    nodes: list[gs.Node]
    x: gs.Tensor
    y: gs.Tensor
    s: np.ndarray
    t: np.ndarray
    axis: int | None

    @property
    def what(self) -> str:
        """What the map is, for messages."""
        return "BN" if self.nodes[0].op == "BatchNormalization" else "the affine map"

    def vectors(self, channels: int, layer: gs.Node, side: str) -> tuple[np.ndarray, np.ndarray]:
        """(s, t) with one value per each of `channels`, or Skip."""
        if max(self.s.size, self.t.size) not in (1, channels):
            raise Skip(f"{layer.op} '{layer.name}' has {channels} {side} channels but {self.what} has "
                       f"{max(self.s.size, self.t.size)}")
        return np.broadcast_to(self.s, channels), np.broadcast_to(self.t, channels)

    def check_axis(self, want: int, rank: int | None, layer: gs.Node, side: str) -> None:
        """Skip unless the map acts on axis `want` of the layer's rank-`rank` tensor."""
        if self.axis is None:
            return
        if rank is None:
            if self.axis != want:
                raise Skip(f"rank of the tensor between {self.what} and {layer.op} '{layer.name}' is unknown, "
                           f"so its axis {self.axis} cannot be matched with the {side} channel axis")
            return
        if self.axis % rank != want % rank:
            raise Skip(f"{self.what} acts on axis {self.axis % rank} of a {rank}-D tensor, but the {side} "
                       f"channels of {layer.op} '{layer.name}' are on axis {want % rank}")

    def scale_only(self) -> "Affine":
        """The same map without its shift."""
        return Affine(self.nodes, self.x, self.y, self.s, np.zeros_like(self.t), self.axis)


def fold_backward(graph: gs.Graph, affine: Affine, names: NameScope) -> tuple[str, str]:
    """Fold `affine` into the layer producing x and remove its nodes; return
    (what it was folded into, "backward"), or raise Skip with the reason."""
    layer = producer(affine.x)
    if layer is None:
        raise Skip("input is a graph input or constant")
    if not any(n is layer for n in graph.nodes):
        raise Skip(f"producer {layer.op} '{layer.name}' is in an enclosing graph")
    if is_observable(graph, affine.x):
        raise Skip(f"output of {layer.op} '{layer.name}' is a graph output")
    if not only_consumer_is(graph, affine.x, affine.nodes[0]):
        raise Skip(f"output of {layer.op} '{layer.name}' is also used elsewhere")
    fold = _BACKWARD.get(layer.op)
    if fold is None or not is_standard(layer):
        raise Skip(f"producer {layer.op} '{layer.name}' is not a foldable layer")
    fold(graph, layer, affine, names)
    source = producer(affine.x)  # a MatMul's new bias Add, or the layer itself
    index = source.outputs.index(affine.x)
    detach(affine.nodes)
    source.outputs[index] = affine.y
    return layer.op if layer.op != "Add" else "MatMul", "backward"


def fold_forward(graph: gs.Graph, affine: Affine, names: NameScope, partial: bool = False) -> tuple[str, str]:
    """Fold `affine` into every layer consuming y and remove its nodes; return
    (what it was folded into, "forward"), or raise Skip with the reason.

    partial: where a consumer cannot take the shift exactly (a Conv that
    zero-pads its input, a ConvTranspose), fold only the scale and keep the
    shift as one `Add(t / s)` before the consumers: returns (..., "partial").
    """
    if is_observable(graph, affine.y):
        raise Skip("output is a graph output")
    # Readers of only y's type or shape (which x shares) just move over to x.
    readers = [r for r in consumers(affine.y) if not _reads_only_type_or_shape(r, affine.y)]
    if not readers:
        raise Skip("output feeds no layer")
    try:
        updates = _plan_forward(graph, readers, affine, names)
        shift = None
    except OnlyScaleFolds as why:
        if not partial:
            raise
        try:
            shift = _shift_values(affine, affine_math.shift_before_scale(affine.s, affine.t))
        except affine_math.NotFoldable as zero:
            raise Skip(f"{why}; scale only: {zero}") from None
        updates = _plan_forward(graph, readers, affine.scale_only(), names)
    x, y = affine.x, affine.y
    detach(affine.nodes)
    if shift is None:
        replace_input(y, x)
    else:
        name = label(affine.nodes[0])
        constant = names.constant(f"{name}.shift", shift)
        graph.nodes.append(gs.Node("Add", names.fresh(f"{name}_shift"), inputs=[x, constant], outputs=[y]))
    for update in updates:
        update()
    return "+".join(sorted({r.op for r in readers})), "forward" if shift is None else "partial"


def _plan_forward(graph, readers, affine, names) -> list:
    """Check every reader before changing any; the updates that fold into them."""
    local = {id(n) for n in graph.nodes}
    updates = []
    for reader in readers:
        plan = _FORWARD.get(reader.op)
        if plan is None or not is_standard(reader) or id(reader) not in local:
            raise Skip(f"consumer {reader.op} '{reader.name}' is not a foldable layer")
        if reader.inputs[0] is not affine.y or any(t is affine.y for t in reader.inputs[1:]):
            raise Skip(f"{affine.what} output is not only the data input of {reader.op} '{reader.name}'")
        updates.append(plan(graph, reader, affine, names))
    return updates


def _shift_values(affine: Affine, shift: np.ndarray) -> np.ndarray:
    """The constant of `Add(x, shift)` along the map's channel axis, in x's dtype;
    raises NotFoldable when x's rank or dtype is unknown."""
    dtype = numpy_dtype(affine.x.dtype)
    if dtype is None or (affine.axis is not None and affine.axis >= 0 and affine.x.shape is None):
        raise affine_math.NotFoldable("the rank or type of its input is unknown")
    if affine.axis is None:
        return shift.reshape(()).astype(dtype)
    from_end = affine.axis - len(affine.x.shape) if affine.axis >= 0 else affine.axis
    return shift.reshape((-1,) + (1,) * (-from_end - 1)).astype(dtype)


def numpy_dtype(dtype):
    """A tensor's dtype (ONNX enum, numpy type or None) as a numpy dtype, or None."""
    if dtype is None:
        return None
    if isinstance(dtype, int):
        return onnx.helper.tensor_dtype_to_np_dtype(dtype)
    return np.dtype(dtype)


def label(node: gs.Node) -> str:
    """A name for things derived from `node`: its name, or its output's."""
    return node.name or node.outputs[0].name


def _reads_only_type_or_shape(node: gs.Node, tensor: gs.Tensor) -> bool:
    """Whether `node` uses `tensor` only for its dtype or shape (Shape, CastLike's
    target), which the affine map leaves unchanged."""
    return (node.op == "Shape" and is_standard(node)) or reads_only_type(node, tensor)


def _weight(node: gs.Node, index: int, opset: int, what: str) -> ConstantRef | None:
    """Constant input `index` of `node` (None when absent), not yet loaded;
    Skip if it is not constant."""
    if len(node.inputs) <= index or not node.inputs[index].name:
        return None
    try:
        return constant_ref(node.inputs[index], opset)
    except NotConstant as why:
        raise Skip(f"{node.op} '{node.name}' {what} is not constant ({why})") from None


def _load(ref: ConstantRef | None) -> np.ndarray | None:
    return None if ref is None else ref.load()


def _set_input(node: gs.Node, index: int, tensor: gs.Tensor) -> None:
    while len(node.inputs) <= index:
        node.inputs.append(gs.Variable.empty())
    node.inputs[index] = tensor


def _replace_weight(node: gs.Node, index: int, names: NameScope, w: ConstantRef, scale) -> None:
    """Input `index` of `node` becomes `scale(W)` in W's dtype, computed at export."""
    like = node.inputs[index].name
    node.inputs[index] = names.deferred_constant(like, lambda: scale(w.load()), w.shape, w.dtype)


def _replace_bias(node: gs.Node, index: int, names: NameScope, values: np.ndarray, like: ConstantRef | None, dtype) -> None:
    """Input `index` of `node` (added if absent) becomes `values` in the old bias's dtype."""
    old = node.inputs[index].name if len(node.inputs) > index and node.inputs[index].name else f"{label(node)}.bias"
    _set_input(node, index, names.constant(old, values.astype(like.dtype if like is not None else dtype)))


# --- backward: fold into the producer of x --------------------------------


def _conv_weight(graph, conv, affine, side: str):
    """(W, groups, s, t) of a Conv/ConvTranspose whose `side` ("input" or
    "output") channels the affine map acts on; Skip when they do not match."""
    w = _weight(conv, 1, graph.opset, "weight")
    groups = int_attr(conv, "group", 1)
    if w is None or w.ndim < 3:
        raise Skip(f"{conv.op} '{conv.name}' weight is not a constant of rank 3 or more")
    affine.check_axis(1, w.ndim, conv, side)
    channels = {("Conv", "output"): w.shape[0], ("ConvTranspose", "input"): w.shape[0]}.get((conv.op, side),
                                                                                             w.shape[1] * groups)
    return (w, groups, *affine.vectors(channels, conv, side))


def _backward_conv(graph, conv, affine, names) -> None:
    w, _, s, t = _conv_weight(graph, conv, affine, "output")
    b = _channel_bias(conv, graph.opset, w.shape[0])
    _replace_weight(conv, 1, names, w, lambda values: affine_math.scale_output_channels(values, s, 0))
    _replace_bias(conv, 2, names, affine_math.output_bias(_load(b), s, t), b, w.dtype)


def _backward_conv_transpose(graph, conv, affine, names) -> None:
    w, groups, s, t = _conv_weight(graph, conv, affine, "output")
    b = _channel_bias(conv, graph.opset, s.size)
    _replace_weight(conv, 1, names, w, lambda values: affine_math.scale_conv_transpose_output(values, s, groups))
    _replace_bias(conv, 2, names, affine_math.output_bias(_load(b), s, t), b, w.dtype)


def _channel_bias(conv: gs.Node, opset: int, channels: int) -> ConstantRef | None:
    """The constant bias of a Conv/ConvTranspose, which must hold one value per output channel."""
    b = _weight(conv, 2, opset, "bias")
    if b is not None and tuple(b.shape) != (channels,):
        raise Skip(f"{conv.op} '{conv.name}' bias of shape {list(b.shape)} is not one value per output channel")
    return b


def _backward_gemm(graph, gemm, affine, names) -> None:
    b = _weight(gemm, 1, graph.opset, "B")
    if b is None or b.ndim != 2:
        raise Skip(f"Gemm '{gemm.name}' B is not a 2-D constant")
    affine.check_axis(1, 2, gemm, "output")
    n_axis = 0 if int_attr(gemm, "transB", 0) else 1
    s, t = affine.vectors(b.shape[n_axis], gemm, "output")
    c = _weight(gemm, 2, graph.opset, "C")
    beta = float_attr(gemm, "beta", 1.0)
    if c is None or beta == 0.0:
        c, beta = None, 1.0
    _replace_weight(gemm, 1, names, b, lambda values: affine_math.scale_output_channels(values, s, n_axis))
    _replace_bias(gemm, 2, names, affine_math.output_bias(_load(c), s, t / beta), c, b.dtype)
    gemm.attrs["beta"] = beta


def _backward_matmul(graph, matmul, affine, names) -> None:
    w = _matmul_weight(graph, matmul, affine, affine.x)
    s, t = affine.vectors(w.shape[1], matmul, "output")
    _replace_weight(matmul, 1, names, w, lambda values: affine_math.scale_output_channels(values, s, 1))
    _append_bias(graph, matmul, t.astype(w.dtype), names)


def _backward_matmul_add(graph, add, affine, names) -> None:
    """MatMul -> Add(bias) -> affine: fold into both the weight and the bias."""
    matmul, bias_index = matmul_feeding(add)
    if matmul is None or len(add.inputs) != 2:
        raise Skip(f"Add '{add.name}' does not add a bias to a MatMul")
    if not only_consumer_is(graph, matmul.outputs[0], add):
        raise Skip(f"output of MatMul '{matmul.name}' is also used elsewhere")
    w = _matmul_weight(graph, matmul, affine, affine.x)
    bias_ref = _weight(add, bias_index, graph.opset, "bias")
    bias = bias_ref.load()
    if bias.size not in (1, w.shape[1]) or any(d != 1 for d in bias.shape[:-1]):
        raise Skip(f"Add '{add.name}' bias of shape {bias.shape} is not a per-output bias")
    s, t = affine.vectors(w.shape[1], matmul, "output")
    _replace_weight(matmul, 1, names, w, lambda values: affine_math.scale_output_channels(values, s, 1))
    _replace_bias(add, bias_index, names, affine_math.output_bias(bias.reshape(-1), s, t), bias_ref, w.dtype)


def matmul_feeding(add: gs.Node) -> tuple[gs.Node | None, int]:
    """The MatMul whose output `add` adds something to, and the other input's index."""
    for bias_index in (1, 0):
        source = producer(add.inputs[1 - bias_index])
        if source is not None and source.op == "MatMul":
            return source, bias_index
    return None, 0


def _matmul_weight(graph: gs.Graph, matmul: gs.Node, affine: Affine, y: gs.Tensor) -> ConstantRef:
    """The constant 2-D weight of a MatMul whose (possibly biased) output or
    input `y` carries the affine map on its last axis."""
    w = _weight(matmul, 1, graph.opset, "weight")
    if w is None or w.ndim != 2:
        raise Skip(f"MatMul '{matmul.name}' weight is not a 2-D constant")
    affine.check_axis(-1, len(y.shape) if y.shape is not None else None, matmul, "feature (last-axis)")
    return w


def _append_bias(graph: gs.Graph, node: gs.Node, bias: np.ndarray, names: NameScope) -> None:
    """Insert `Add(bias)` right after single-output `node`, which stays in `graph`."""
    out = node.outputs[0]
    mid = names.variable(f"{out.name}_nobias", dtype=out.dtype, shape=out.shape)
    node.outputs[0] = mid
    bias_constant = names.constant(f"{label(node)}.bias", bias)
    graph.nodes.append(gs.Node("Add", names.fresh(f"{label(node)}_bias"), inputs=[mid, bias_constant], outputs=[out]))


_BACKWARD = {
    "Conv": _backward_conv,
    "ConvTranspose": _backward_conv_transpose,
    "Gemm": _backward_gemm,
    "MatMul": _backward_matmul,
    "Add": _backward_matmul_add,
}


# --- forward: fold into the consumers of y ------------------------------------


def _forward_conv(graph, conv, affine, names):
    w, groups, s, t = _conv_weight(graph, conv, affine, "input")
    if pads_input(conv) and np.any(t != 0):
        raise OnlyScaleFolds(
            f"Conv '{conv.name}' zero-pads its input and {affine.what} shifts it (t != 0), so the fold "
            "would change the border values"
        )
    b = _weight(conv, 2, graph.opset, "bias")
    bias = affine_math.output_bias(_load(b), 1.0, affine_math.conv_input_shift(w.load(), t, groups))

    def update():
        _replace_weight(conv, 1, names, w, lambda values: affine_math.scale_conv_input(values, s, groups))
        _replace_bias(conv, 2, names, bias, b, w.dtype)

    return update


def _forward_conv_transpose(graph, conv, affine, names):
    w, _, s, t = _conv_weight(graph, conv, affine, "input")
    if np.any(t != 0):
        raise OnlyScaleFolds(f"ConvTranspose '{conv.name}' spreads a shift of its input unevenly over its "
                             f"output (borders, strides), so {affine.what}'s shift (t != 0) does not fold")

    def update():
        _replace_weight(conv, 1, names, w, lambda values: affine_math.scale_conv_transpose_input(values, s))

    return update


def pads_input(conv: gs.Node) -> bool:
    """Whether `conv` zero-pads its input (explicit pads or SAME auto-padding)."""
    auto_pad = conv.attrs.get("auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad == "VALID":
        return False
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return True
    return any(int(p) != 0 for p in conv.attrs.get("pads", []))


def _forward_gemm(graph, gemm, affine, names):
    if int_attr(gemm, "transA", 0):
        raise Skip(f"Gemm '{gemm.name}' has transA=1, so {affine.what}'s channels are not its K axis")
    b = _weight(gemm, 1, graph.opset, "B")
    k_axis = 1 if int_attr(gemm, "transB", 0) else 0
    if b is None or b.ndim != 2:
        raise Skip(f"Gemm '{gemm.name}' B is not a 2-D constant")
    affine.check_axis(1, 2, gemm, "input")
    s, t = affine.vectors(b.shape[k_axis], gemm, "input (K)")
    c = _weight(gemm, 2, graph.opset, "C")
    alpha, beta = float_attr(gemm, "alpha", 1.0), float_attr(gemm, "beta", 1.0)
    shift = affine_math.matrix_input_shift(b.load(), t, k_axis)
    if c is None or beta == 0.0:
        c, c2, beta = None, alpha * shift, 1.0
    else:
        c2 = np.asarray(c.load(), dtype=np.float64) + (alpha / beta) * shift

    def update():
        _replace_weight(gemm, 1, names, b, lambda values: affine_math.scale_matrix_input(values, s, k_axis))
        _replace_bias(gemm, 2, names, c2, c, b.dtype)
        gemm.attrs["beta"] = beta

    return update


def _forward_matmul(graph, matmul, affine, names):
    w = _matmul_weight(graph, matmul, affine, affine.y)
    s, t = affine.vectors(w.shape[0], matmul, "input (K)")
    shift = affine_math.matrix_input_shift(w.load(), t, 0)

    def update():
        _replace_weight(matmul, 1, names, w, lambda values: affine_math.scale_matrix_input(values, s, 0))
        if np.any(shift != 0):
            _append_bias(graph, matmul, shift.astype(w.dtype), names)

    return update


_FORWARD = {"Conv": _forward_conv, "ConvTranspose": _forward_conv_transpose, "Gemm": _forward_gemm,
            "MatMul": _forward_matmul}

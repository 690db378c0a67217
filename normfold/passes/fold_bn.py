"""Fold inference BatchNormalization into neighbouring linear layers.

    backward:  Conv | ConvTranspose | Gemm | MatMul(+Add)  ->  BN     =>  layer'
    forward:   BN  ->  Conv (unpadded or t = 0) | Gemm | MatMul   =>  layer'

A BN that folds neither way is kept, or with `standalone="affine"` rewritten
as Mul(s) -> Add(t). Every BN left is reported with the reason. The algebra
is in `bn_math`; this module only decides where it applies and rewires.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from normfold.report import PassReport

from normfold.passes import bn_math
from normfold.passes.batchnorm import BN, Skip, inference_bn
from normfold.ir.verbs import (
    ConstantRef,
    NameScope,
    NotConstant,
    bypass,
    constant_ref,
    constant_value,
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
    walk_graphs,
)



@dataclass
class Affine:
    """A BN node as the affine map `y = s ⊙ x + t` on axis 1 (float64)."""

    node: gs.Node
    s: np.ndarray
    t: np.ndarray

    @property
    def x(self) -> gs.Tensor:
        return self.node.inputs[0]

    @property
    def y(self) -> gs.Tensor:
        return self.node.outputs[0]


def fold_bn(graph: gs.Graph, direction: str = "both", standalone: str = "keep") -> PassReport:
    """Fold every exactly-foldable BN of `graph` (and its subgraphs) in place.

    direction: "both", "backward" (into the producer) or "forward" (into the consumers).
    standalone: "keep" or "affine" (rewrite unfoldable BN as Mul+Add).
    """
    if direction not in ("both", "backward", "forward"):
        raise ValueError(f"direction must be both, backward or forward, not {direction!r}")
    if standalone not in ("keep", "affine"):
        raise ValueError(f"standalone must be keep or affine, not {standalone!r}")
    report = PassReport("fold-bn")
    names = NameScope(graph)
    for g, where in walk_graphs(graph):
        _fold_graph(g, graph.opset, names, direction, standalone, report, where)
    return report


def _fold_graph(graph, opset, names, direction, standalone, report, where) -> None:
    folds = []
    if direction in ("both", "backward"):
        folds.append(("backward", _fold_backward))
    if direction in ("both", "forward"):
        folds.append(("forward", _fold_forward))
    reasons: dict[int, str] = {}
    progress = True
    while progress:  # folding one BN can make another foldable (BN -> BN -> Conv)
        progress = False
        for node in [n for n in graph.nodes if n.op == BN and n.outputs]:
            try:
                bn = _as_affine(graph, node, opset)
            except Skip as why:
                reasons[id(node)] = str(why)
                continue
            failures = []
            for how, fold in folds:
                try:
                    into = fold(graph, bn, names)
                except Skip as why:
                    failures.append(f"{how}: {why}")
                    continue
                report.changed(node.name, BN, into, how, where)
                reasons.pop(id(node), None)
                progress = True
                break
            else:
                reasons[id(node)] = "; ".join(failures)
    for node in [n for n in graph.nodes if n.op == BN and n.outputs]:  # folded ones have none
        reason = reasons.get(id(node), "not examined")
        if standalone == "affine":
            try:
                _rewrite_as_affine(graph, _as_affine(graph, node, opset), names)
                report.changed(node.name, BN, "Mul+Add", "standalone", where)
                continue
            except Skip as why:
                reason = f"{reason}; affine rewrite: {why}"
        report.skip(node.name, BN, reason, where)
    graph.cleanup()


def _as_affine(graph: gs.Graph, node: gs.Node, opset: int) -> Affine:
    """Read an inference BN as (s, t), or raise Skip saying why it is not one."""
    bn = inference_bn(graph, node, opset)
    channels = bn.mean.size
    shape = node.inputs[0].shape
    if shape is not None and len(shape) >= 2 and isinstance(shape[1], int) and shape[1] != channels:
        raise Skip(f"input has {shape[1]} channels but the parameters have {channels}")
    try:
        s, t = bn_math.bn_affine(bn.scale, bn.bias, bn.mean, bn.var, bn.epsilon)
    except bn_math.NotFoldable as why:
        raise Skip(str(why)) from None
    return Affine(node, s, t)


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


def _label(node: gs.Node) -> str:
    """A name for things derived from `node`: its name, or its output's."""
    return node.name or node.outputs[0].name


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
    old = node.inputs[index].name if len(node.inputs) > index and node.inputs[index].name else f"{_label(node)}.bias"
    _set_input(node, index, names.constant(old, values.astype(like.dtype if like is not None else dtype)))


# --- backward: fold into the producer of x --------------------------------


def _fold_backward(graph: gs.Graph, bn: Affine, names: NameScope) -> str:
    layer = producer(bn.x)
    if layer is None:
        raise Skip("input is a graph input or constant")
    if not only_consumer_is(graph, bn.x, bn.node):
        raise Skip(f"output of {layer.op} '{layer.name}' is also used elsewhere")
    fold = _BACKWARD.get(layer.op)
    if fold is None or not is_standard(layer):
        raise Skip(f"producer {layer.op} '{layer.name}' is not a foldable layer")
    fold(graph, layer, bn, names)
    bypass(bn.node, bn.x)
    return layer.op if layer.op != "Add" else "MatMul"


def _backward_conv(graph, conv, bn, names) -> None:
    w = _weight(conv, 1, graph.opset, "weight")
    if w is None or w.shape[0] != bn.s.size:
        raise Skip(f"Conv '{conv.name}' weight does not have {bn.s.size} output channels")
    b = _channel_bias(conv, graph.opset, bn.s.size)
    s = bn.s
    _replace_weight(conv, 1, names, w, lambda values: bn_math.scale_output_channels(values, s, 0))
    _replace_bias(conv, 2, names, bn_math.output_bias(_load(b), bn.s, bn.t), b, w.dtype)


def _backward_conv_transpose(graph, conv, bn, names) -> None:
    w = _weight(conv, 1, graph.opset, "weight")
    groups = int_attr(conv, "group", 1)
    if w is None or w.ndim < 2 or w.shape[1] * groups != bn.s.size:
        raise Skip(f"ConvTranspose '{conv.name}' weight does not have {bn.s.size} output channels")
    b = _channel_bias(conv, graph.opset, bn.s.size)
    s = bn.s
    _replace_weight(conv, 1, names, w, lambda values: bn_math.scale_conv_transpose_output(values, s, groups))
    _replace_bias(conv, 2, names, bn_math.output_bias(_load(b), bn.s, bn.t), b, w.dtype)


def _channel_bias(conv: gs.Node, opset: int, channels: int) -> ConstantRef | None:
    """The constant bias of a Conv/ConvTranspose, which must hold one value per output channel."""
    b = _weight(conv, 2, opset, "bias")
    if b is not None and tuple(b.shape) != (channels,):
        raise Skip(f"{conv.op} '{conv.name}' bias of shape {list(b.shape)} is not one value per output channel")
    return b


def _backward_gemm(graph, gemm, bn, names) -> None:
    b = _weight(gemm, 1, graph.opset, "B")
    if b is None or b.ndim != 2:
        raise Skip(f"Gemm '{gemm.name}' B is not a 2-D constant")
    n_axis = 0 if int_attr(gemm, "transB", 0) else 1
    if b.shape[n_axis] != bn.s.size:
        raise Skip(f"Gemm '{gemm.name}' has {b.shape[n_axis]} outputs but BN has {bn.s.size} channels")
    c = _weight(gemm, 2, graph.opset, "C")
    beta = float_attr(gemm, "beta", 1.0)
    if c is None or beta == 0.0:
        c, beta = None, 1.0
    s = bn.s
    _replace_weight(gemm, 1, names, b, lambda values: bn_math.scale_output_channels(values, s, n_axis))
    _replace_bias(gemm, 2, names, bn_math.output_bias(_load(c), bn.s, bn.t / beta), c, b.dtype)
    gemm.attrs["beta"] = beta


def _backward_matmul(graph, matmul, bn, names) -> None:
    w = _matmul_weight(graph, matmul, bn.x)
    s = bn.s
    _replace_weight(matmul, 1, names, w, lambda values: bn_math.scale_output_channels(values, s, 1))
    _append_bias(graph, matmul, bn.t.astype(w.dtype), names)


def _backward_matmul_add(graph, add, bn, names) -> None:
    """MatMul -> Add(bias) -> BN: fold into both the weight and the bias."""
    matmul, bias_index = _matmul_feeding(add)
    if matmul is None or len(add.inputs) != 2:
        raise Skip(f"Add '{add.name}' does not add a bias to a MatMul")
    if not only_consumer_is(graph, matmul.outputs[0], add):
        raise Skip(f"output of MatMul '{matmul.name}' is also used elsewhere")
    w = _matmul_weight(graph, matmul, bn.x)
    bias_ref = _weight(add, bias_index, graph.opset, "bias")
    bias = bias_ref.load()
    if bias.size not in (1, w.shape[1]) or any(d != 1 for d in bias.shape[:-1]):
        raise Skip(f"Add '{add.name}' bias of shape {bias.shape} is not a per-output bias")
    s = bn.s
    _replace_weight(matmul, 1, names, w, lambda values: bn_math.scale_output_channels(values, s, 1))
    _replace_bias(add, bias_index, names, bn_math.output_bias(bias.reshape(-1), bn.s, bn.t), bias_ref, w.dtype)


def _matmul_feeding(add: gs.Node) -> tuple[gs.Node | None, int]:
    """The MatMul whose output `add` adds something to, and the other input's index."""
    for bias_index in (1, 0):
        source = producer(add.inputs[1 - bias_index])
        if source is not None and source.op == "MatMul":
            return source, bias_index
    return None, 0


def _matmul_weight(graph: gs.Graph, matmul: gs.Node, y: gs.Tensor) -> ConstantRef:
    """The constant 2-D weight of a MatMul whose (possibly biased) output `y` is
    2-D, so that BN's channel axis 1 is the MatMul's output axis."""
    w = _weight(matmul, 1, graph.opset, "weight")
    if w is None or w.ndim != 2:
        raise Skip(f"MatMul '{matmul.name}' weight is not a 2-D constant")
    shape = y.shape
    if shape is None:
        raise Skip(f"rank of MatMul '{matmul.name}' output is unknown (BN must act on its last axis)")
    if len(shape) != 2:
        raise Skip(f"MatMul '{matmul.name}' output is {len(shape)}-D: BN normalizes axis 1, not the output features")
    return w


def _append_bias(graph: gs.Graph, node: gs.Node, bias: np.ndarray, names: NameScope) -> None:
    """Insert `Add(bias)` right after single-output `node`, which stays in `graph`."""
    out = node.outputs[0]
    mid = names.variable(f"{out.name}_nobias", dtype=out.dtype, shape=out.shape)
    node.outputs[0] = mid
    bias_constant = names.constant(f"{_label(node)}.bias", bias)
    graph.nodes.append(gs.Node("Add", names.fresh(f"{_label(node)}_bias"), inputs=[mid, bias_constant], outputs=[out]))


_BACKWARD = {
    "Conv": _backward_conv,
    "ConvTranspose": _backward_conv_transpose,
    "Gemm": _backward_gemm,
    "MatMul": _backward_matmul,
    "Add": _backward_matmul_add,
}


# --- forward: fold into the consumers of y ------------------------------------


def _fold_forward(graph: gs.Graph, bn: Affine, names: NameScope) -> str:
    if is_observable(graph, bn.y):
        raise Skip("output is a graph output")
    # Readers of only y's type or shape (which x shares) just move over to x.
    readers = [r for r in consumers(bn.y) if not _reads_only_type_or_shape(r, bn.y)]
    if not readers:
        raise Skip("output feeds no layer")
    local = {id(n) for n in graph.nodes}
    updates = []
    for reader in readers:  # check every reader before changing any
        plan = _FORWARD.get(reader.op)
        if plan is None or not is_standard(reader) or id(reader) not in local:
            raise Skip(f"consumer {reader.op} '{reader.name}' is not a foldable layer")
        if reader.inputs[0] is not bn.y or any(t is bn.y for t in reader.inputs[1:]):
            raise Skip(f"BN output is not only the data input of {reader.op} '{reader.name}'")
        updates.append(plan(graph, reader, bn, names))
    x, y = bn.x, bn.y
    detach([bn.node])
    replace_input(y, x)
    for update in updates:
        update()
    return "+".join(sorted({r.op for r in readers}))


def _reads_only_type_or_shape(node: gs.Node, tensor: gs.Tensor) -> bool:
    """Whether `node` uses `tensor` only for its dtype or shape (Shape, CastLike's
    target), which BN leaves unchanged."""
    return (node.op == "Shape" and is_standard(node)) or reads_only_type(node, tensor)


def _forward_conv(graph, conv, bn, names):
    w = _weight(conv, 1, graph.opset, "weight")
    groups = int_attr(conv, "group", 1)
    if w is None or w.ndim < 2 or w.shape[1] * groups != bn.s.size:
        raise Skip(f"Conv '{conv.name}' weight does not have {bn.s.size} input channels")
    if _pads_input(conv) and np.any(bn.t != 0):
        raise Skip(
            f"Conv '{conv.name}' zero-pads its input and BN shifts it (t != 0), so the fold "
            "would change the border values"
        )
    b = _weight(conv, 2, graph.opset, "bias")
    s = bn.s
    bias = bn_math.output_bias(_load(b), 1.0, bn_math.conv_input_shift(w.load(), bn.t, groups))

    def update():
        _replace_weight(conv, 1, names, w, lambda values: bn_math.scale_conv_input(values, s, groups))
        _replace_bias(conv, 2, names, bias, b, w.dtype)

    return update


def _pads_input(conv: gs.Node) -> bool:
    auto_pad = conv.attrs.get("auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad == "VALID":
        return False
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return True
    return any(int(p) != 0 for p in conv.attrs.get("pads", []))


def _forward_gemm(graph, gemm, bn, names):
    if int_attr(gemm, "transA", 0):
        raise Skip(f"Gemm '{gemm.name}' has transA=1, so BN's channels are not its K axis")
    b = _weight(gemm, 1, graph.opset, "B")
    k_axis = 1 if int_attr(gemm, "transB", 0) else 0
    if b is None or b.ndim != 2 or b.shape[k_axis] != bn.s.size:
        raise Skip(f"Gemm '{gemm.name}' B is not a constant with {bn.s.size} rows of K")
    c = _weight(gemm, 2, graph.opset, "C")
    alpha, beta = float_attr(gemm, "alpha", 1.0), float_attr(gemm, "beta", 1.0)
    shift = bn_math.matrix_input_shift(b.load(), bn.t, k_axis)
    if c is None or beta == 0.0:
        c, c2, beta = None, alpha * shift, 1.0
    else:
        c2 = np.asarray(c.load(), dtype=np.float64) + (alpha / beta) * shift
    s = bn.s

    def update():
        _replace_weight(gemm, 1, names, b, lambda values: bn_math.scale_matrix_input(values, s, k_axis))
        _replace_bias(gemm, 2, names, c2, c, b.dtype)
        gemm.attrs["beta"] = beta

    return update


def _forward_matmul(graph, matmul, bn, names):
    w = _matmul_weight(graph, matmul, bn.y)
    if w.shape[0] != bn.s.size:
        raise Skip(f"MatMul '{matmul.name}' weight does not have {bn.s.size} rows")
    shift = bn_math.matrix_input_shift(w.load(), bn.t, 0)
    s = bn.s

    def update():
        _replace_weight(matmul, 1, names, w, lambda values: bn_math.scale_matrix_input(values, s, 0))
        _append_bias(graph, matmul, shift.astype(w.dtype), names)

    return update


_FORWARD = {"Conv": _forward_conv, "Gemm": _forward_gemm, "MatMul": _forward_matmul}


# --- standalone: Mul + Add ----------------------------------------------------


def _rewrite_as_affine(graph: gs.Graph, bn: Affine, names: NameScope) -> None:
    shape = bn.x.shape
    if shape is None or len(shape) < 2:
        raise Skip("input rank is unknown")
    dtype = _numpy_dtype(bn.x.dtype) or constant_value(bn.node.inputs[1], graph.opset).dtype
    broadcast = (-1,) + (1,) * (len(shape) - 2)  # channel axis 1, aligned from the right
    x, y, name = bn.x, bn.y, _label(bn.node)
    scaled = names.variable(f"{y.name}_scaled", dtype=bn.x.dtype, shape=shape)
    s = names.constant(f"{name}.scale", bn.s.reshape(broadcast).astype(dtype))
    t = names.constant(f"{name}.shift", bn.t.reshape(broadcast).astype(dtype))
    detach([bn.node])
    graph.nodes.append(gs.Node("Mul", names.fresh(f"{name}_mul"), inputs=[x, s], outputs=[scaled]))
    graph.nodes.append(gs.Node("Add", names.fresh(f"{name}_add"), inputs=[scaled, t], outputs=[y]))


def _numpy_dtype(dtype):
    if dtype is None:
        return None
    if isinstance(dtype, int):
        return onnx.helper.tensor_dtype_to_np_dtype(dtype)
    return np.dtype(dtype)

"""Standard-ONNX function bodies of normfold's `com.normfold` ops.

A model carrying `make_function(op, elem_type, opset)` in `ModelProto.functions`
runs without normfold's library: onnxruntime binds the library's kernel when
it is registered and inlines the body when it is not, and
`onnx.reference.ReferenceEvaluator` runs the body. Each body reads like the
formula of `../shared/NORMS.md` (see `custom_ops/README.md` for the ops) and
computes, like the kernels, in float32 for float16/bfloat16/float32 inputs and
in float64 for float64 inputs; attributes are passed through as attribute
references. Every input is required in a body: `normfold fuse` writes the
neutral value of an optional input (zero bias or tau, unit scale) so the node
can be served by either.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx.numpy_helper
from onnx import TensorProto, helper

from normfold.ops.table import DOMAIN, OPS

ELEM_TYPES = (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16)
MIN_OPSET = 11  # Unique, and Slice with tensor bounds


class _Body:
    """Nodes of one function body, added like `b.op("Add", x, y)`; attribute
    references and constants become Constant nodes."""

    def __init__(self, opset: int, compute_type: int):
        self.opset, self.compute_type = opset, compute_type
        self.nodes: list[onnx.NodeProto] = []
        self._names = 0

    def op(self, op_type: str, *inputs: str, **attrs) -> str:
        self._names += 1
        out = f"{op_type.lower()}_{self._names}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def const(self, values, dtype=np.int64) -> str:
        array = np.asarray(values, dtype=dtype)
        return self.op("Constant", value=onnx.numpy_helper.from_array(array, "value"))

    def attr(self, name: str, kind: str) -> str:
        """A tensor holding attribute `name` of the calling node (kind: int, float, string)."""
        out = self.op("Constant")
        ref = onnx.AttributeProto(name=f"value_{kind}", ref_attr_name=name,
                                  type={"int": onnx.AttributeProto.INT, "float": onnx.AttributeProto.FLOAT,
                                        "string": onnx.AttributeProto.STRING}[kind])
        self.nodes[-1].attribute.append(ref)
        return out

    def flag(self, name: str) -> str:
        """Bool scalar: int attribute `name` is non-zero."""
        return self.op("Cast", self.attr(name, "int"), to=TensorProto.BOOL)

    def scalar(self, name: str) -> str:
        """Float attribute `name` in the compute type."""
        return self.op("Cast", self.attr(name, "float"), to=self.compute_type)

    def compute(self, x: str) -> str:
        return self.op("Cast", x, to=self.compute_type)

    def reduce(self, op_type: str, x: str, axes: list[int]) -> str:
        if self.opset >= 18 or (op_type == "ReduceSum" and self.opset >= 13):
            return self.op(op_type, x, self.const(axes), keepdims=1)
        return self.op(op_type, x, axes=axes, keepdims=1)

    def dims(self, x: str, start: int | str, end: int | str | None = None) -> str:
        """Shape of `x` from `start` to `end` (ints or 1-element tensors), as a 1-D int64 tensor."""
        bound = [start if isinstance(start, str) else self.const([start]),
                 end if isinstance(end, str) else self.const([end if end is not None else 2**62])]
        return self.op("Slice", self.op("Shape", x), *bound)

    def shape(self, *parts: str | list[int]) -> str:
        """Concatenated shape from 1-D tensors and int lists."""
        return self.op("Concat", *(p if isinstance(p, str) else self.const(p) for p in parts), axis=0)

    def standardize(self, x: str, axis: int, epsilon: str, centered: bool = True) -> str:
        """(x - mean) / sqrt(var + ε) over `axis` (keepdims); without centering x / sqrt(mean(x²) + ε)."""
        d = self.op("Sub", x, self.reduce("ReduceMean", x, [axis])) if centered else x
        variance = self.reduce("ReduceMean", self.op("Mul", d, d), [axis])
        return self.op("Div", d, self.op("Sqrt", self.op("Add", variance, epsilon)))

    def affine(self, y: str, scale: str, bias: str | None, shape: list[int]) -> str:
        """y · scale + bias, the parameters reshaped to `shape` (one -1 for their elements)."""
        y = self.op("Mul", y, self.op("Reshape", self.compute(scale), self.const(shape)))
        return y if bias is None else self.op("Add", y, self.op("Reshape", self.compute(bias), self.const(shape)))


def _group_norm(b: _Body, x: str = "X") -> str:
    x = b.compute(x)
    groups = b.op("Reshape", b.attr("num_groups", "int"), b.const([1]))
    y = b.standardize(b.op("Reshape", x, b.shape(b.dims(x, 0, 1), groups, [-1])), 2, b.scalar("epsilon"))
    y = b.affine(b.op("Reshape", y, b.shape(b.dims(x, 0, 2), [-1])), "scale", "bias", [-1, 1])
    silu = b.op("Mul", y, b.op("Sigmoid", y))
    # ONNX below opset 19 cannot compare strings: two strings are equal iff Unique leaves one
    names = b.op("Concat", b.op("Reshape", b.attr("activation", "string"), b.const([1])),
                 b.const(["silu"], dtype=object), axis=0)
    is_silu = b.op("Equal", b.op("Shape", b.op("Unique", names)), b.const([1]))
    return b.op("Reshape", b.op("Where", is_silu, silu, y), b.op("Shape", x))


def _bias_group_norm(b: _Body) -> str:
    """GroupNorm of X + add, add ([N, C] values) broadcast over the positions; the sum in X's type."""
    per_channel = b.dims("X", 0, 2)
    shifted = b.op("Add", b.op("Reshape", "X", b.shape(per_channel, [-1])),
                   b.op("Reshape", "add", b.shape(per_channel, [1])))
    return _group_norm(b, b.op("Reshape", shifted, b.op("Shape", "X")))


def _layer_norm(b: _Body) -> str:
    # one 3-D view for both forms, normalized over its axis 1 (no If: shape inference would
    # check the branch not taken against the parameters' shapes):
    #   last axes [axis, rank):  [prod(shape[:axis]), -1, 1]
    #   channel-first:           [N, C, -1]
    x = b.compute("X")
    axis = b.op("Reshape", b.attr("axis", "int"), b.const([1]))
    last_axes = b.shape(b.reduce("ReduceProd", b.dims(x, 0, axis), [0]), [-1, 1])
    view = b.op("Where", b.flag("channel_first"), b.shape(b.dims(x, 0, 2), [-1]), last_axes)
    y = b.standardize(b.op("Reshape", x, view), 1, b.scalar("epsilon"))
    return b.op("Reshape", b.affine(y, "scale", "bias", [-1, 1]), b.op("Shape", x))


def _rms_norm(b: _Body, x: str = "X", centered: bool = False, bias: str | None = None) -> str:
    """RMSNorm of `x` over axes [axis, rank); `centered` with `bias`: a last-axes LayerNorm."""
    x = b.compute(x)
    axis = b.op("Reshape", b.attr("axis", "int"), b.const([1]))
    rows = b.op("Reshape", x, b.shape(b.reduce("ReduceProd", b.dims(x, 0, axis), [0]), [-1]))
    y = b.affine(b.standardize(rows, 1, b.scalar("epsilon"), centered=centered), "scale", bias, [-1])
    return b.op("Reshape", y, b.op("Shape", x))


def _residual_sum(b: _Body) -> str:
    """Output `sum` = X + skip, in the input type (as the Add it replaces)."""
    b.nodes.append(helper.make_node("Add", ["X", "skip"], ["sum"]))
    return "sum"


def _skip_layer_norm(b: _Body) -> str:
    return _rms_norm(b, _residual_sum(b), centered=True, bias="bias")


def _skip_rms_norm(b: _Body) -> str:
    return _rms_norm(b, _residual_sum(b))


def _filter_response_norm(b: _Body) -> str:
    x = b.compute("X")
    epsilon = b.op("Abs", b.scalar("epsilon"))  # |ε|, as for a learned ε
    y = b.standardize(b.op("Reshape", x, b.shape(b.dims(x, 0, 2), [-1])), 2, epsilon, centered=False)
    y = b.affine(y, "gamma", "beta", [-1, 1])
    tlu = b.op("Max", y, b.op("Reshape", b.compute("tau"), b.const([-1, 1])))
    return b.op("Reshape", b.op("Where", b.flag("use_tlu"), tlu, y), b.op("Shape", x))


def _weight_norm(b: _Body) -> str:
    v = b.compute("V")
    dim = b.op("Reshape", b.attr("dim", "int"), b.const([1]))
    after = b.op("Add", dim, b.const([1]))
    blocks = b.shape(b.reduce("ReduceProd", b.dims(v, 0, dim), [0]), b.dims(v, dim, after), [-1])
    v3 = b.op("Reshape", v, blocks)  # [before dim, dim, after dim]
    norm = b.op("Sqrt", b.reduce("ReduceSum", b.op("Mul", v3, v3), [0, 2]))
    g = b.op("Reshape", b.compute("g"), b.const([1, -1, 1]))
    return b.op("Reshape", b.op("Mul", v3, b.op("Div", g, norm)), b.op("Shape", v))


_BODIES = {"GroupNorm": _group_norm, "LayerNorm": _layer_norm, "RMSNorm": _rms_norm,
           "FilterResponseNorm": _filter_response_norm, "WeightNorm": _weight_norm,
           "BiasGroupNorm": _bias_group_norm, "SkipLayerNorm": _skip_layer_norm, "SkipLayerNormSum": _skip_layer_norm, "SkipRMSNorm": _skip_rms_norm,
           "SkipRMSNormSum": _skip_rms_norm}


def make_function(op: str, elem_type: int, opset: int) -> onnx.FunctionProto:
    """The body of com.normfold `op` for inputs of `elem_type`, in ONNX `opset`."""
    if op not in OPS:
        raise ValueError(f"no function body for {DOMAIN}.{op}")
    if elem_type not in ELEM_TYPES:
        raise ValueError(f"com.normfold.{op}: element type {TensorProto.DataType.Name(elem_type)} is not one of "
                         "float, double, float16, bfloat16")
    if opset < MIN_OPSET:
        raise ValueError(f"function bodies need ONNX opset >= {MIN_OPSET}, the model has {opset}")
    b = _Body(opset, TensorProto.DOUBLE if elem_type == TensorProto.DOUBLE else TensorProto.FLOAT)
    result = _BODIES[op](b)
    b.nodes.append(helper.make_node("Cast", [result], ["Y"], to=elem_type))
    signature = OPS[op]
    defaults = [helper.make_attribute(k, v) for k, v in signature.attributes.items() if v is not None]
    required = [k for k, v in signature.attributes.items() if v is None]
    return helper.make_function(DOMAIN, op, list(signature.inputs), list(signature.outputs), b.nodes, [helper.make_opsetid("", opset)],
                                attributes=required, attribute_protos=defaults,
                                doc_string=f"com.normfold.{op} in standard ONNX ops (normfold); T = "
                                           f"{TensorProto.DataType.Name(elem_type).lower()}")

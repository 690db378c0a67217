"""Hand-built ONNX graphs of normalization subgraphs in every spelling the
exporters use (and look-alikes), plus float64 numpy references of the layers.

Complements tests/norm_models.py (real PyTorch exports): here each spelling is
chosen explicitly, so a property test can draw them at random.
"""

from __future__ import annotations

import numpy as np
import onnx

from tests.helpers.graphs import G

SPELLINGS = ("div", "reciprocal", "one_div", "pow_neg_half", "pow_half_div")


def reduce_mean(g: G, x: str, axes, name=None) -> str:
    """ReduceMean with keepdims=1; axes as attribute below opset 18, as input from 18."""
    if g.opset >= 18:
        return g.op("ReduceMean", [x, g.const(np.array(axes, np.int64))], keepdims=1, name=name)
    return g.op("ReduceMean", [x], axes=list(axes), keepdims=1, name=name)


def normalize(g: G, d: str, axes, eps: float, *, spelling="div", square="pow", eps_first=False,
              eps_node=False) -> str:
    """d / sqrt(mean(d², axes) + eps) in the chosen spelling."""
    sq = g.op("Pow", [d, g.const(np.array(2.0))]) if square == "pow" else g.op("Mul", [d, d])
    var = reduce_mean(g, sq, axes)
    e = g.const_node(np.array(eps)) if eps_node else g.const(np.array(eps))
    shifted = g.op("Add", [e, var] if eps_first else [var, e])
    if spelling == "div":
        return g.op("Div", [d, g.op("Sqrt", [shifted])])
    if spelling == "reciprocal":
        return g.op("Mul", [d, g.op("Reciprocal", [g.op("Sqrt", [shifted])])])
    if spelling == "one_div":
        return g.op("Mul", [g.op("Div", [g.const(np.array(1.0)), g.op("Sqrt", [shifted])]), d])
    if spelling == "pow_neg_half":
        return g.op("Mul", [d, g.op("Pow", [shifted, g.const(np.array(-0.5))])])
    if spelling == "pow_half_div":
        return g.op("Div", [d, g.op("Pow", [shifted, g.const(np.array(0.5))])])
    raise ValueError(spelling)


def affine(g: G, y: str, scale=None, bias=None, scale_first=False) -> str:
    """y * scale + bias (each optional), scale on either side of the Mul."""
    if scale is not None:
        s = g.const(scale)
        y = g.op("Mul", [s, y] if scale_first else [y, s])
    if bias is not None:
        y = g.op("Add", [y, g.const(bias)])
    return y


def layer_norm(g: G, x: str, axes, eps, **kw) -> str:
    """The decomposed LayerNorm core (x - mean) / sqrt(var + eps) over `axes`."""
    d = g.op("Sub", [x, reduce_mean(g, x, axes)])
    return normalize(g, d, axes, eps, **kw)


def group_norm(g: G, x: str, channels: int, groups: int, eps: float, *, shape_from="shape",
               in_scale=None, in_bias=None) -> str:
    """Reshape [N, G, -1] -> InstanceNormalization -> Reshape back, as both exporters write it."""
    grouped = g.op("Reshape", [x, g.const(np.array([0, groups, -1], np.int64))])
    s = g.const(np.ones(groups) if in_scale is None else in_scale)
    b = g.const(np.zeros(groups) if in_bias is None else in_bias)
    normed = g.op("InstanceNormalization", [grouped, s, b], epsilon=eps)
    if shape_from == "shape":
        return g.op("Reshape", [normed, g.op("Shape", [x])])
    shape = np.array(g.feeds[x].shape if x in g.feeds else shape_from, np.int64)
    return g.op("Reshape", [normed, g.const(shape)])


def silu(g: G, y: str) -> str:
    return g.op("Mul", [y, g.op("Sigmoid", [y])])


# ----------------------------------------------------------------- float64 references

def ref_normalize(x: np.ndarray, axes, eps: float, centered: bool) -> np.ndarray:
    x = x.astype(np.float64)
    d = x - x.mean(axis=tuple(axes), keepdims=True) if centered else x
    return d / np.sqrt((d * d).mean(axis=tuple(axes), keepdims=True) + eps)


def ref_group_norm(x: np.ndarray, groups: int, eps: float) -> np.ndarray:
    n, c = x.shape[:2]
    grouped = x.astype(np.float64).reshape(n, groups, -1)
    return ref_normalize(grouped, (2,), eps, True).reshape(x.shape)


def custom_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.domain == "com.normfold"]

"""LayerNorm, RMSNorm and Filter Response Norm as the exporters decompose them.

All three share one core, anchored at the ReduceMean of a square:

    d   = x                       (RMSNorm, FRN)   or   x - ReduceMean(x, axes)   (LayerNorm)
          or Cast(x - ReduceMean(x, axes), float32/float64) of a float16/bfloat16 x, x̂ then
          cast back to x's type (TorchScript's fp16 LayerNorm): one LayerNorm of x
    v   = ReduceMean(d^2, axes)   d^2 as Pow(d, 2) or Mul(d, d)
    x̂   = d / Sqrt(v + ε)   |   d * Reciprocal(Sqrt(v + ε))   |   d * (1 / Sqrt(v + ε))
                            |   d * Pow(v + ε, -0.5)          |   d / Pow(v + ε, 0.5)

and differ in what follows and which axes are reduced:

    LayerNorm, last axes:    centered, axes = the last k;  x̂ * γ + β, γ/β over those axes
    LayerNorm, channel-first: centered, axes = [1] of N×C×...;  γ/β per channel
    FRN (+TLU):              not centered, axes = spatial [2, r); γ/β per channel; Max(·, τ)
    RMSNorm:                 not centered, axes = the last k;  x̂ * γ (no bias)

A LayerNorm over the last axis of a tensor that a Transpose made
channel-last, whose result is transposed back, becomes a channel-first
LayerNorm of the original tensor (Transpose→LayerNorm→Transpose).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from normfold.ir.verbs import consumers, is_standard, producer
from normfold.passes.fuse.group_norm import match_grouped_normalization
from normfold.passes.fuse.emit import FusedNorm
from normfold.passes.matching import (Affine, Match, NoMatch, down_cast, low_precision_type, match_affine, other_input,
                                     per_axes_values, rank_of, reduce_axes, static_dim, up_cast)

ANCHORS = ("ReduceMean", "LayerNormalization")


@dataclass
class Core:
    """The matched normalization core: x̂ = normalized `x` over `axes`."""

    x: gs.Tensor
    centered: bool
    axes: tuple[int, ...]
    epsilon: float
    normalized: gs.Tensor


def match_moment_norm(m: Match, anchor: gs.Node) -> FusedNorm:
    """The LayerNorm / RMSNorm / FRN subgraph around `anchor` (the ReduceMean of
    the square, or a standard LayerNormalization between Transposes)."""
    if anchor.op == "LayerNormalization":
        return _transposed_standard_layer_norm(m, anchor)
    core = _match_core(m, anchor)
    rank = len(core.x.shape)
    last = tuple(range(core.axes[0], rank)) == core.axes
    if core.centered:
        grouped = match_grouped_normalization(m, core.x, core.normalized, core.epsilon) if core.axes == (2,) and \
            rank == 3 else None
        if grouped is not None:
            return grouped
        if last:
            return _channel_first_if_transposed(m, _layer_norm(m, core, core.axes))
        if core.axes == (1,) and rank >= 3:
            return _layer_norm(m, core, (1,), channel_first=True)
        raise NoMatch(f"centered normalization over axes {list(core.axes)} of a rank-{rank} tensor: "
                      "no fused op normalizes over these axes")
    if core.axes == tuple(range(2, rank)) and rank >= 3:
        frn = _filter_response_norm(m, core)
        if frn is not None:
            return frn
    if last:
        return _rms_norm(m, core)
    raise NoMatch(f"mean square over axes {list(core.axes)} of a rank-{rank} tensor: "
                  "no fused op normalizes over these axes")


def _match_core(m: Match, reduce: gs.Node) -> Core:
    square = producer(reduce.inputs[0])
    if square is None or not is_standard(square) or square.op not in ("Pow", "Mul"):
        raise NoMatch("ReduceMean of something other than a square", candidate=False)
    if square.op == "Pow":
        d = square.inputs[0]
        m.expect_scalar(square.inputs[1], 2.0, f"exponent of Pow '{square.name}'")
    elif square.inputs[0] is square.inputs[1]:
        d = square.inputs[0]
    else:
        raise NoMatch("ReduceMean of a product of two different tensors", candidate=False)
    m.take(square)
    m.take(reduce)
    rank = rank_of(d)
    if rank is None:
        raise NoMatch(f"rank of '{d.name}' is unknown")
    axes = reduce_axes(m, reduce, rank)
    add = m.next(reduce.outputs[0], "Add")
    epsilon = m.scalar(other_input(add, reduce.outputs[0]), f"epsilon of Add '{add.name}'")
    if epsilon < 0:
        raise NoMatch(f"epsilon is negative ({epsilon:g})")
    normalized = _divide_by_root(m, d, add.outputs[0])
    low_precision = _centered_in_low_precision(m, d, normalized, axes, rank, epsilon)
    if low_precision is not None:
        return low_precision
    x, centered = _uncentered(m, d, axes, rank)
    return Core(x, centered, axes, epsilon, normalized)


def _centered_in_low_precision(m: Match, d: gs.Tensor, normalized: gs.Tensor, axes, rank, epsilon) -> Core | None:
    """The core as a LayerNorm of x when `d` is Cast(x - ReduceMean(x, axes), float32 or
    float64) of a float16/bfloat16 x and `normalized` is cast back to x's type (the fused op
    computes in float32, far finer than x's rounding, and keeps x's type); the casts and
    the centering are taken. None otherwise (nothing taken)."""
    up = up_cast(d)
    if up is None:
        return None
    back = down_cast(m, normalized, low_precision_type(up.inputs[0]))
    if back is None:
        return None
    x, centered = _uncentered(m, up.inputs[0], axes, rank)
    if not centered:
        return None
    m.take(up)
    return Core(x, True, axes, epsilon, m.take(back).outputs[0])


def _uncentered(m: Match, d: gs.Tensor, axes, rank) -> tuple[gs.Tensor, bool]:
    """(x, True) if `d` is x - ReduceMean(x, axes), else (d, False)."""
    sub = producer(d)
    if sub is None or sub.op != "Sub" or not is_standard(sub):
        return d, False
    x, mean = sub.inputs
    reduce = producer(mean)
    if reduce is None or reduce.op != "ReduceMean" or reduce.inputs[0] is not x:
        return d, False
    if reduce_axes(m, reduce, rank) != axes:
        raise NoMatch(f"the mean of ReduceMean '{reduce.name}' and the variance reduce different axes")
    m.take(sub)
    m.take(reduce)
    return x, True


def _divide_by_root(m: Match, d: gs.Tensor, shifted: gs.Tensor) -> gs.Tensor:
    """x̂ = d / sqrt(`shifted`) in any of its exported spellings; takes the nodes."""
    root = m.next(shifted, "Sqrt", "Pow")
    power = 0.5 if root.op == "Sqrt" else m.scalar(root.inputs[1], f"exponent of Pow '{root.name}'")
    r = root.outputs[0]
    if power == 0.5:  # r = sqrt: x̂ = d / r, or d * (1 / r)
        step = m.sole_consumer(r, "Div", "Reciprocal")
        if step is not None and step.op == "Div" and step.inputs[1] is r and m.same_value(step.inputs[0], d):
            return m.take(step).outputs[0]
        if step is not None and step.op == "Div" and step.inputs[1] is r:
            m.expect_scalar(step.inputs[0], 1.0, f"numerator of Div '{step.name}'")
        elif step is None:
            raise NoMatch(f"square root '{r.name}' is not divided into the input")
        r = m.take(step).outputs[0]
    elif power != -0.5:
        raise NoMatch(f"exponent of Pow '{root.name}' is {power:g}, expected 0.5 or -0.5")
    mul = m.sole_consumer(r, "Mul")
    if mul is None or not m.same_value(other_input(mul, r), d):
        raise NoMatch(f"inverse root '{r.name}' is not multiplied into the input alone")
    return m.take(mul).outputs[0]


def _layer_norm(m: Match, core: Core, param_axes, channel_first: bool = False) -> FusedNorm:
    affine = _take_affine(m, match_affine(m, core.normalized, core.x, param_axes))
    shape = [static_dim(core.x, a) for a in param_axes]
    scale = affine.scale if affine.scale is not None else np.ones(shape)
    attrs = {"epsilon": core.epsilon, "axis": 1 if channel_first else core.axes[0]}
    if channel_first:
        attrs["channel_first"] = 1
    label = "channel-first" if channel_first else "last axes"
    return _fused(m, "LayerNorm", "ln", core.x, affine, [scale, affine.bias], attrs, label)


def _rms_norm(m: Match, core: Core) -> FusedNorm:
    affine = _take_affine(m, match_affine(m, core.normalized, core.x, core.axes, with_bias=False))
    attrs = {"epsilon": core.epsilon, "axis": core.axes[0]}
    return _fused(m, "RMSNorm", "rms", core.x, affine, [affine.scale], attrs, "")


def _filter_response_norm(m: Match, core: Core) -> FusedNorm | None:
    """FRN if a per-channel affine or a TLU follows; None (not taken) otherwise."""
    affine = match_affine(m, core.normalized, core.x, (1,))
    tau, tlu = _tlu(m, affine.out, core.x)
    if affine.scale is None and affine.bias is None and tlu is None:
        return None
    _take_affine(m, affine)
    channels = static_dim(core.x, 1)
    gamma = affine.scale if affine.scale is not None else np.ones(channels)
    beta = affine.bias if affine.bias is not None else np.zeros(channels)
    out = affine.out
    if tlu is not None:
        m.take(tlu)
        out = tlu.outputs[0]
    attrs = {"epsilon": core.epsilon, "use_tlu": int(tlu is not None)}
    label = "+TLU" if tlu is not None else ""
    return _fused(m, "FilterResponseNorm", "frn", core.x, affine, [gamma, beta, tau], attrs, label, out)


def _tlu(m: Match, y: gs.Tensor, x: gs.Tensor) -> tuple[np.ndarray | None, gs.Node | None]:
    """τ and the Max(y, τ) node when a per-channel constant TLU follows `y`."""
    node = m.sole_consumer(y, "Max")
    if node is None or len(node.inputs) != 2:
        return None, None
    try:
        tau = m.constant(other_input(node, y), f"tau of Max '{node.name}'")
        return per_axes_values(tau, x, (1,), "tau"), node
    except NoMatch:
        return None, None


def _take_affine(m: Match, affine: Affine) -> Affine:
    for node in affine.nodes:
        m.take(node)
    return affine


def _fused(m: Match, kind, family, x, affine: Affine, params, attrs, label, out=None) -> FusedNorm:
    out = out or affine.out
    m.check_private(out)
    return FusedNorm(kind, family, x, out, list(m.nodes), params, attrs, label, left=affine.left)


# ------------------------------------------------- Transpose -> LayerNorm(last axis) -> Transpose

def _channel_first_if_transposed(m: Match, fused: FusedNorm) -> FusedNorm:
    """Turn a last-axis LayerNorm of a channel-last transpose, transposed back,
    into a channel-first LayerNorm of the untransposed tensor."""
    around = _channel_last_transposes(m, fused.x, fused.out, fused.attrs["axis"])
    if around is None:
        return fused
    before, after = around
    fused.nodes += [before, after]
    fused.x, fused.out = before.inputs[0], after.outputs[0]
    fused.attrs.update(axis=1, channel_first=1)
    fused.label = "channel-first, from Transpose-LN-Transpose"
    return fused


def _channel_last_transposes(m: Match, x: gs.Tensor, y: gs.Tensor, axis: int):
    """(Transpose into channel-last, Transpose back) around a last-axis
    normalization of `x` into `y`, or None. `x` must be read only by the match."""
    before, rank = producer(x), rank_of(x)
    if before is None or before.op != "Transpose" or not is_standard(before) or rank is None or rank < 3:
        return None
    if axis % rank != rank - 1 or list(before.attrs.get("perm", [])) != [0, *range(2, rank), 1]:
        return None
    after = m.sole_consumer(y, "Transpose")
    if after is None or list(after.attrs.get("perm", [])) != [0, rank - 1, *range(1, rank - 1)]:
        return None
    inside = {id(n) for n in m.nodes}
    if any(id(r) not in inside for r in consumers(x)) or any(o is x for o in m.graph.outputs):
        return None
    return before, after


def _transposed_standard_layer_norm(m: Match, node: gs.Node) -> FusedNorm:
    """Transpose→LayerNormalization(last axis, constant scale/bias)→Transpose."""
    x, rank = node.inputs[0], rank_of(node.inputs[0])
    axis = int(node.attrs.get("axis", -1))
    if rank is None or node.attrs.get("stash_type", 1) != 1:
        raise NoMatch("LayerNormalization with unknown rank or stash_type other than float", candidate=False)
    m.take(node)
    if _channel_last_transposes(m, x, node.outputs[0], axis) is None:
        raise NoMatch("a standard LayerNormalization not between channel-last Transposes", candidate=False)
    scale = m.constant(node.inputs[1], f"scale of LayerNormalization '{node.name}'")
    bias = m.constant(node.inputs[2], "bias") if len(node.inputs) > 2 and node.inputs[2].name else None
    channels = static_dim(x, -1)
    if channels is None:
        raise NoMatch(f"channel count of '{x.name}' is unknown")
    scale = np.broadcast_to(scale, (channels,)).copy()
    bias = None if bias is None else np.broadcast_to(bias, (channels,)).copy()
    attrs = {"epsilon": float(node.attrs.get("epsilon", 1e-5)), "axis": rank - 1}
    fused = FusedNorm("LayerNorm", "ln", x, node.outputs[0], [node], [scale, bias], attrs, "last axes")
    return _channel_first_if_transposed(m, fused)

"""GroupNorm as the exporters write it, plus a trailing SiLU.

    x [N, C, ...] -> Reshape [N, G, -1] -> InstanceNormalization(s, b, ε) -> Reshape [shape of x]
      -> Mul(γ) -> Add(β)                                  (opsets < 21, both exporters)
    x -> GroupNormalization(scale, bias, num_groups, ε)    (18-20: per-group scale; 21+: per-channel)
    x -> Reshape [N, G, -1] -> LayerNorm core over the last axis -> Reshape back -> Mul -> Add
                                                           (GroupNorm written by hand)

either followed, optionally, by Sigmoid(y) and Mul(y, ·) (SiLU). The
InstanceNormalization's own scale/bias (ones and zeros as exported, but any
per-group constants are exact too) are combined with γ/β per channel.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from normfold.ir.verbs import is_observable, is_standard, producer
from normfold.passes.fuse.emit import FusedNorm
from normfold.passes.matching import Affine, Match, NoMatch, match_affine, same_dims, static_dim, value_readers

ANCHORS = ("InstanceNormalization", "GroupNormalization")


def match_group_norm(m: Match, anchor: gs.Node) -> FusedNorm:
    """The GroupNorm subgraph around `anchor` (an InstanceNormalization fed by a
    grouping Reshape, or a standard GroupNormalization)."""
    if anchor.op == "GroupNormalization":
        return _standard(m, anchor)
    grouping = producer(anchor.inputs[0])
    if grouping is None or grouping.op != "Reshape" or not is_standard(grouping):
        raise NoMatch("InstanceNormalization not fed by a Reshape", candidate=False)
    m.take(grouping)
    m.take(anchor)
    ungroup = m.sole_consumer(anchor.outputs[0], "Reshape")
    if ungroup is None:
        raise NoMatch(f"InstanceNormalization '{anchor.name}' is not followed by a Reshape alone")
    groups = _groups(m, grouping, grouping.inputs[0])
    group_scale = _per_group(m, anchor, 1, groups)
    group_bias = _per_group(m, anchor, 2, groups)
    return _ungrouped(m, grouping, ungroup, group_scale, group_bias, float(anchor.attrs.get("epsilon", 1e-5)))


def match_grouped_normalization(m: Match, grouped: gs.Tensor, normalized: gs.Tensor, epsilon: float) -> FusedNorm | None:
    """GroupNorm written by hand: `normalized` is `grouped` (x reshaped to [N, G, -1])
    normalized over its last axis, and is reshaped back to x's shape. None if not."""
    grouping, ungroup = producer(grouped), m.sole_consumer(normalized, "Reshape")
    if grouping is None or grouping.op != "Reshape" or not is_standard(grouping) or ungroup is None:
        return None
    trial = Match(m.graph, m.opset, [*m.nodes, grouping])
    try:
        groups = _groups(trial, grouping, grouping.inputs[0])
        ones = np.ones(groups)
        fused = _ungrouped(trial, grouping, ungroup, ones, 0 * ones, epsilon)
    except NoMatch:
        return None
    m.nodes[:] = trial.nodes
    return fused


def _ungrouped(m: Match, grouping: gs.Node, ungroup: gs.Node, group_scale, group_bias, epsilon) -> FusedNorm:
    """Finish a GroupNorm match at the Reshape back to x's shape: per-group scale/bias
    of the grouped normalization combined with the per-channel affine that follows."""
    x = grouping.inputs[0]
    channels = static_dim(x, 1)
    groups = len(group_scale)
    if not _restores_shape(ungroup, x):
        raise NoMatch(f"Reshape '{ungroup.name}' does not restore the shape of '{x.name}'")
    m.take(ungroup)
    affine = match_affine(m, ungroup.outputs[0], x, (1,))
    for node in affine.nodes:
        m.take(node)
    gamma = affine.scale if affine.scale is not None else np.ones(channels)
    beta = affine.bias if affine.bias is not None else np.zeros(channels)
    per_group = channels // groups
    scale = gamma * np.repeat(group_scale, per_group)
    bias = gamma * np.repeat(group_bias, per_group) + beta
    return _with_silu(m, x, affine, scale, bias, groups, epsilon)


def _groups(m: Match, grouping: gs.Node, x: gs.Tensor) -> int:
    """G of a Reshape x -> [N, G, rest] that splits each sample's channels into G groups."""
    channels = static_dim(x, 1)
    if channels is None:
        raise NoMatch(f"channel count of '{x.name}' is unknown")
    grouped = grouping.outputs[0]
    try:
        target = [int(v) for v in m.constant(grouping.inputs[1], "grouping shape").reshape(-1)]
        copies_batch = target[:1] == [0] and not int(grouping.attrs.get("allowzero", 0))
        batch_ok = len(target) == 3 and (copies_batch or target[0] == static_dim(x, 0))
        groups = target[1] if len(target) == 3 else 0
    except NoMatch:  # a shape computed at run time: rely on the inferred output shape
        shape = grouped.shape or []
        batch_ok = len(shape) == 3 and x.shape is not None and shape[0] == x.shape[0] and shape[0] is not None
        groups = shape[1] if len(shape) == 3 and isinstance(shape[1], int) else 0
    if not batch_ok or groups <= 0:
        raise NoMatch(f"Reshape '{grouping.name}' does not group '{x.name}' as [N, G, -1]")
    if channels % groups:
        raise NoMatch(f"{channels} channels do not split into {groups} groups")
    return groups


def _restores_shape(reshape: gs.Node, x: gs.Tensor) -> bool:
    """Whether Reshape `reshape` gives back the shape of `x`."""
    source = producer(reshape.inputs[1])
    if source is not None and source.op == "Shape" and source.inputs[0] is x and not source.attrs.get("start") \
            and source.attrs.get("end") is None:
        return True
    return same_dims(reshape.outputs[0], x)


def _per_group(m: Match, node: gs.Node, index: int, groups: int) -> np.ndarray:
    """InstanceNormalization input `index`: [G] constants."""
    value = m.constant(node.inputs[index], f"{'scale' if index == 1 else 'bias'} of InstanceNormalization "
                                           f"'{node.name}'").astype(np.float64).reshape(-1)
    if value.size != groups:
        raise NoMatch(f"InstanceNormalization '{node.name}' input {index} has {value.size} values for {groups} groups")
    return value


def _standard(m: Match, node: gs.Node) -> FusedNorm:
    """A GroupNormalization-18/21 node (constant scale and bias)."""
    m.take(node)
    x = node.inputs[0]
    channels, groups = static_dim(x, 1), int(node.attrs.get("num_groups", 0))
    if channels is None:
        raise NoMatch(f"channel count of '{x.name}' is unknown")
    if groups <= 0 or channels % groups:
        raise NoMatch(f"{channels} channels do not split into num_groups={groups}")
    if int(node.attrs.get("stash_type", 1)) != 1:
        raise NoMatch(f"GroupNormalization '{node.name}' computes in a type other than float (stash_type)")
    per_channel = m.opset >= 21
    size = channels if per_channel else groups
    params = []
    for index, what in ((1, "scale"), (2, "bias")):
        value = m.constant(node.inputs[index], f"{what} of GroupNormalization '{node.name}'").astype(np.float64)
        if value.size != size:
            raise NoMatch(f"{what} of GroupNormalization '{node.name}' has {value.size} values, expected {size}")
        params.append(value.reshape(-1) if per_channel else np.repeat(value.reshape(-1), channels // groups))
    affine = Affine(None, None, node.outputs[0], [])
    return _with_silu(m, x, affine, params[0], params[1], groups, float(node.attrs.get("epsilon", 1e-5)))


def _with_silu(m: Match, x, affine: Affine, scale, bias, groups: int, epsilon: float) -> FusedNorm:
    y = affine.out
    m.check_private(y)
    fused = FusedNorm("GroupNorm", "gn", x, y, list(m.nodes), [scale, bias],
                      {"num_groups": groups, "epsilon": epsilon, "activation": "none"}, left=affine.left)
    silu = _silu(m, y)
    if silu is not None:
        fused.activation_nodes, fused.activation_out = silu, silu[-1].outputs[0]
        fused.attrs["activation"] = "silu"
        fused.label = "+SiLU"
    return fused


def _silu(m: Match, y: gs.Tensor) -> list[gs.Node] | None:
    """[Sigmoid, Mul] computing y * sigmoid(y), when they are `y`'s only readers."""
    readers = value_readers(y)
    if len(readers) != 2 or is_observable(m.graph, y):
        return None
    sigmoid = next((r for r in readers if r.op == "Sigmoid" and is_standard(r)), None)
    mul = next((r for r in readers if r.op == "Mul" and is_standard(r)), None)
    if sigmoid is None or mul is None:
        return None
    s = sigmoid.outputs[0]
    if {id(i) for i in mul.inputs} != {id(y), id(s)} or len(value_readers(s)) != 1 or is_observable(m.graph, s):
        return None
    return [sigmoid, mul]

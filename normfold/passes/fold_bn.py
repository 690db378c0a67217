"""Fold inference BatchNormalization into neighbouring linear layers.

    backward:  Conv | ConvTranspose | Gemm | MatMul(+Add)  ->  BN     =>  layer'
    forward:   BN  ->  Conv (unpadded or t = 0) | ConvTranspose (t = 0) | Gemm | MatMul   =>  layer'

Each BN is read as the affine map `y = s ⊙ x + t` on axis 1 (`bn_math`) and
folded by the affine-fold core (`affine_fold`). A BN that folds neither way is
kept, or with `standalone="affine"` rewritten as Mul(s) -> Add(t). Every BN
left is reported with the reason.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from normfold.ir.verbs import NameScope, constant_value, detach, walk_graphs
from normfold.passes import bn_math
from normfold.passes.affine_fold import Affine, fold_backward, fold_forward, label, numpy_dtype
from normfold.passes.affine_math import NotFoldable
from normfold.passes.batchnorm import BN, Skip, inference_bn
from normfold.report import EXCLUDED, PassReport


def fold_bn(graph: gs.Graph, direction: str = "both", standalone: str = "keep",
            exclude: frozenset[str] = frozenset()) -> PassReport:
    """Fold every exactly-foldable BN of `graph` (and its subgraphs) in place.

    direction: "both", "backward" (into the producer) or "forward" (into the consumers).
    standalone: "keep" or "affine" (rewrite unfoldable BN as Mul+Add).
    exclude: names of BN nodes to leave as they are.
    """
    if direction not in ("both", "backward", "forward"):
        raise ValueError(f"direction must be both, backward or forward, not {direction!r}")
    if standalone not in ("keep", "affine"):
        raise ValueError(f"standalone must be keep or affine, not {standalone!r}")
    report = PassReport("fold-bn")
    names = NameScope(graph)
    for g, where in walk_graphs(graph):
        _fold_graph(g, graph.opset, names, direction, standalone, report, where, exclude)
    return report


def _fold_graph(graph, opset, names, direction, standalone, report, where, exclude) -> None:
    folds = []
    if direction in ("both", "backward"):
        folds.append(("backward", fold_backward))
    if direction in ("both", "forward"):
        folds.append(("forward", fold_forward))
    reasons: dict[int, str] = {}
    progress = True
    while progress:  # folding one BN can make another foldable (BN -> BN -> Conv)
        progress = False
        for node in [n for n in graph.nodes if n.op == BN and n.outputs and n.name not in exclude]:
            try:
                bn = bn_as_affine(graph, node, opset)
            except Skip as why:
                reasons[id(node)] = str(why)
                continue
            failures = []
            for how, fold in folds:
                try:
                    into, _ = fold(graph, bn, names)
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
        reason = EXCLUDED if node.name in exclude else reasons.get(id(node), "not examined")
        if standalone == "affine" and node.name not in exclude:
            try:
                _rewrite_as_affine(graph, bn_as_affine(graph, node, opset), names)
                report.changed(node.name, BN, "Mul+Add", "standalone", where)
                continue
            except Skip as why:
                reason = f"{reason}; affine rewrite: {why}"
        report.skip(node.name, BN, reason, where)
    graph.cleanup()


def bn_as_affine(graph: gs.Graph, node: gs.Node, opset: int) -> Affine:
    """Read an inference BN as the affine map (s, t) on axis 1, or raise Skip saying why it is not one."""
    bn = inference_bn(graph, node, opset)
    channels = bn.mean.size
    shape = node.inputs[0].shape
    if shape is not None and len(shape) >= 2 and isinstance(shape[1], int) and shape[1] != channels:
        raise Skip(f"input has {shape[1]} channels but the parameters have {channels}")
    try:
        s, t = bn_math.bn_affine(bn.scale, bn.bias, bn.mean, bn.var, bn.epsilon)
    except NotFoldable as why:
        raise Skip(str(why)) from None
    return Affine([node], node.inputs[0], node.outputs[0], s, t, axis=1)


# --- standalone: Mul + Add ----------------------------------------------------


def _rewrite_as_affine(graph: gs.Graph, bn: Affine, names: NameScope) -> None:
    shape = bn.x.shape
    if shape is None or len(shape) < 2:
        raise Skip("input rank is unknown")
    node = bn.nodes[0]
    dtype = numpy_dtype(bn.x.dtype) or constant_value(node.inputs[1], graph.opset).dtype
    broadcast = (-1,) + (1,) * (len(shape) - 2)  # channel axis 1, aligned from the right
    x, y, name = bn.x, bn.y, label(node)
    scaled = names.variable(f"{y.name}_scaled", dtype=bn.x.dtype, shape=shape)
    s = names.constant(f"{name}.scale", bn.s.reshape(broadcast).astype(dtype))
    t = names.constant(f"{name}.shift", bn.t.reshape(broadcast).astype(dtype))
    detach([node])
    graph.nodes.append(gs.Node("Mul", names.fresh(f"{name}_mul"), inputs=[x, s], outputs=[scaled]))
    graph.nodes.append(gs.Node("Add", names.fresh(f"{name}_add"), inputs=[scaled, t], outputs=[y]))

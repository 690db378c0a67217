"""Weight normalization and weight standardisation on layer weights.

    constant v, g:   w = g · v / ‖v‖, (w - mean) / sqrt(var + ε) or w / ‖w‖ (cosine
                     normalisation) computed from constants and fed to a
                     Conv/ConvTranspose/Gemm/MatMul weight: the weight is computed once,
                     offline, and the subgraph dropped;
    runtime v or g:  v / ReduceL2(v, all axes but dim) · g  (any operand order)
                     becomes one com.normfold WeightNorm(v, g, dim) node.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from normfold.report import PassReport

from normfold.ir.verbs import (
    NameScope,
    NotConstant,
    constant_value,
    detach,
    is_observable,
    producer,
    replace_input,
    walk_graphs,
)
from normfold.ops.table import DOMAIN
from normfold.passes.matching import Match, NoMatch, other_input, rank_of, reduce_axes

_LAYERS = {"Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (0, 1, 2), "MatMul": (0, 1)}
_NORM_OPS = {"ReduceL2": "weight norm", "LpNormalization": "weight norm", "Sqrt": "weight standardisation"}


def fold_weight_norm(graph: gs.Graph, report: PassReport | None = None,
                     exclude: frozenset[str] = frozenset()) -> PassReport:
    """Compute constant weight-norm / weight-standardisation subgraphs feeding layer
    weights offline, and turn runtime weight norm into WeightNorm nodes.
    exclude: names of layers and ReduceL2 nodes (a reported change's node) to leave as they are."""
    report = report or PassReport("fold-wn")
    names = NameScope(graph)
    for g, where in walk_graphs(graph):
        for node in list(g.nodes):
            if node.op in _LAYERS and node.name not in exclude:
                _fold_constant_inputs(g, graph.opset, node, names, report, where)
        g.cleanup()  # drops the subgraphs just computed offline
        for node in list(g.nodes):
            if node.op == "ReduceL2" and node.outputs and node.name not in exclude:
                _fuse_runtime(g, graph.opset, node, names, report, where)
        g.cleanup()
    return report


def _fold_constant_inputs(graph, opset, layer, names, report, where) -> None:
    for index in _LAYERS[layer.op]:
        if index >= len(layer.inputs):
            continue
        tensor = layer.inputs[index]
        nodes = _computing_nodes(tensor)
        kind = _normalization_kind(nodes)
        if kind is None:
            continue
        try:
            value = constant_value(tensor, opset)
        except NotConstant:
            continue  # runtime weight norm: handled by _fuse_runtime
        replace_input(tensor, names.constant(tensor.name, value))
        report.changed(layer.name, "+".join(n.op for n in nodes), f"constant {layer.op} input {index}", kind, where)


def _normalization_kind(nodes: list[gs.Node]) -> str | None:
    """'weight norm' / 'weight standardisation' if the subgraph `nodes` contains
    a norm or a square root, 'normalised weight' if it divides (by a norm an
    exporter already folded, as in cosine normalisation); None otherwise."""
    kinds = [_NORM_OPS[node.op] for node in nodes if node.op in _NORM_OPS]
    if kinds:
        return kinds[0]
    return "normalised weight" if any(node.op == "Div" for node in nodes) else None


def _computing_nodes(tensor: gs.Tensor, limit: int = 64) -> list[gs.Node]:
    """The nodes upstream of `tensor` (up to `limit`)."""
    seen, stack, nodes = set(), [tensor], []
    while stack and len(nodes) < limit:
        node = producer(stack.pop())
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        nodes.append(node)
        stack.extend(node.inputs)
    return nodes


def _fuse_runtime(graph, opset, reduce, names, report, where) -> None:
    m = Match(graph, opset)
    try:
        v, g, dim, out = _match_runtime(m, reduce)
    except NoMatch as why:
        if why.candidate:
            report.skip(reduce.name, reduce.op, str(why), where)
        return
    replaced = "+".join(n.op for n in m.nodes)
    try:  # constant v and g, not feeding a layer weight: still computed offline
        value = None if is_observable(graph, out) else constant_value(out, opset)
    except NotConstant:
        value = None
    detach(m.nodes)
    if value is not None:
        constant = names.constant(out.name, value)
        replace_input(out, constant)
        report.changed(reduce.name, replaced, "constant", "weight norm", where)
        return
    graph.nodes.append(gs.Node("WeightNorm", names.fresh(f"{out.name}_WeightNorm"), {"dim": dim}, [v, g], [out],
                               domain=DOMAIN))
    report.changed(reduce.name, replaced, f"{DOMAIN}.WeightNorm", f"{len(m.nodes)} nodes", where)


def _match_runtime(m: Match, reduce: gs.Node):
    """(v, g, dim, output) of g · v / ReduceL2(v) around `reduce`."""
    v = reduce.inputs[0]
    rank = rank_of(v)
    if rank is None:
        raise NoMatch(f"rank of '{v.name}' is unknown", candidate=False)
    axes = reduce_axes(m, reduce, rank)
    kept = [a for a in range(rank) if a not in axes]
    if len(kept) != 1:
        raise NoMatch("ReduceL2 does not keep exactly one axis", candidate=False)
    m.take(reduce)
    norm = reduce.outputs[0]
    div = m.sole_consumer(norm, "Div")
    if div is None or div.inputs[1] is not norm:
        raise NoMatch(f"norm '{norm.name}' is not a divisor alone", candidate=False)
    m.take(div)
    mul = m.sole_consumer(div.outputs[0], "Mul")
    if mul is None:
        raise NoMatch(f"'{div.outputs[0].name}' is not multiplied by g")
    m.take(mul)
    if div.inputs[0] is v:  # (v / ‖v‖) · g
        g = other_input(mul, div.outputs[0])
    else:  # v · (g / ‖v‖)
        g = div.inputs[0]
        if other_input(mul, div.outputs[0]) is not v:
            raise NoMatch(f"Mul '{mul.name}' does not multiply v")
    dim = kept[0]
    g_shape = None if g.shape is None else [1] * (rank - len(g.shape)) + list(g.shape)
    expected = [v.shape[a] if a == dim else 1 for a in range(rank)]
    if g_shape is None or len(g_shape) != rank or g_shape != expected or not isinstance(expected[dim], int):
        raise NoMatch(f"g '{g.name}' of shape {None if g.shape is None else list(g.shape)} does not have "
                      f"one value per slice of axis {dim} of v")
    m.check_private(mul.outputs[0])
    return v, g, kept[0], mul.outputs[0]

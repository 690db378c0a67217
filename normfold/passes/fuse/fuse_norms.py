"""Replace the subgraphs exporters emit for normalization layers with one op each.

    gn   GroupNorm (+SiLU)      Reshape→InstanceNormalization→Reshape→Mul→Add, GroupNormalization-18/21
    ln   LayerNorm              decomposed last-axes and channel-first forms, Transpose→LN→Transpose
    rms  RMSNorm                Pow→ReduceMean→Add→Sqrt→Reciprocal/Div→Mul(→Mul γ) and variants
    frn  FilterResponseNorm     Pow→ReduceMean→Add→Sqrt/Rsqrt→Div/Mul→Mul→Add(→Max τ)
    wn   weight norm / weight standardisation (see `fold_weight_norm`)

Matching is exact (every constant and every broadcast layout is checked) and
an intermediate tensor read outside the subgraph stops the match; each such
near miss is reported with its reason. The matchers live in the
sibling modules; what a match becomes (`com.normfold` op or standard ONNX op) is
decided by `emit` under `target`.
"""

from __future__ import annotations

from typing import Callable, Iterable

import onnx_graphsurgeon as gs

from normfold.report import EXCLUDED, PassReport

from normfold.passes.fuse import group_norm as match_group_norm, moment_norm as match_moment_norm
from normfold.passes.fold_weight_norm import fold_weight_norm
from normfold.ir.verbs import NameScope, is_constant, walk_graphs
from normfold.ops.table import FAMILIES
from normfold.passes.fuse.emit import TARGETS, FusedNorm, emit
from normfold.passes.fuse.fused_adds import fuse_adds
from normfold.passes.matching import Match, NoMatch

_MATCHER_AT: dict[str, Callable[[Match, gs.Node], FusedNorm]] = {  # anchor op -> its matcher
    **{op: match_group_norm.match_group_norm for op in match_group_norm.ANCHORS},
    **{op: match_moment_norm.match_moment_norm for op in match_moment_norm.ANCHORS},
}
_STANDARD_ANCHORS = ("GroupNormalization", "LayerNormalization")


def fuse_norms(graph: gs.Graph, ops: Iterable[str] = FAMILIES, target: str = "auto",
               exclude: frozenset[str] = frozenset()) -> PassReport:
    """Fuse every exactly-matching normalization subgraph of `graph` (and its
    subgraphs) in place.

    ops: which kinds to fuse (subset of gn, ln, rms, frn, wn).
    target: "custom" (com.normfold ops), "standard" (ONNX ops, where the opset
    has them) or "auto" (per kind, whichever onnxruntime runs fastest).
    exclude: names of anchor nodes (a reported change's node) to leave as they are.
    """
    ops = set(ops)
    if not ops <= set(FAMILIES):
        raise ValueError(f"unknown ops {sorted(ops - set(FAMILIES))}; choose from {', '.join(FAMILIES)}")
    if target not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(TARGETS)}, not {target!r}")
    report = PassReport("fuse")
    names = NameScope(graph)
    for g, where in walk_graphs(graph):
        for node in list(g.nodes):
            if node.outputs:  # nodes of an earlier match are detached
                _fuse_at(g, graph.opset, node, ops, target, names, report, where, exclude)
        fuse_adds(g, graph.opset, ops, names, report, where, exclude, standard_norms=target != "standard")
        g.cleanup()
    if "wn" in ops:
        fold_weight_norm(graph, report=report, exclude=exclude)
    return report


def unfused_norm_nodes(graph: gs.Graph, opset: int) -> list[gs.Node]:
    """The nodes of each normalization subgraph of `graph` (not its subgraphs) that the fuse
    pass matches but has not replaced: a kind left out (`ops`), or fuse not run."""
    found = []
    for node in graph.nodes:
        if node.op not in _MATCHER_AT:
            continue
        try:
            fused = _MATCHER_AT[node.op](Match(graph, opset), node)
        except NoMatch:
            continue
        if not is_constant(fused.x, opset):
            found += fused.nodes
    return found


def _fuse_at(graph, opset, node, ops, target, names, report, where, exclude) -> None:
    if target == "standard" and node.op in _STANDARD_ANCHORS:
        return  # already a standard op
    if node.op not in _MATCHER_AT:
        return
    if node.name in exclude:
        report.skip(node.name, node.op, EXCLUDED, where)
        return
    try:
        fused = _MATCHER_AT[node.op](Match(graph, opset), node)
        if fused.family not in ops or is_constant(fused.x, opset):
            return  # another kind, or a norm of a constant (the wn part computes those offline)
        into, replaced = emit(graph, names, fused, target, opset)
    except NoMatch as why:
        if why.candidate:
            report.skip(node.name, node.op, str(why), where)
        return
    how = f"{len(replaced)} nodes" + (f", {fused.label}" if fused.label else "")
    report.changed(node.name, "+".join(op for op, _ in replaced), into, how, where)
    for left, reason in fused.left:
        report.skip(left.name, left.op, f"kept after the fused {fused.describe}: {reason}", where)

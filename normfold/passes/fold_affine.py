"""Fold chains of per-channel affine steps into neighbouring linear layers.

A step is `Mul`, `Div`, `Add` or `Sub` of the data and a constant (operands in
either order: `c - x` is `-1·x + c`; `c / x` is not a step, and neither is an
operation on two constants, left to constant folding), or an inference
BatchNorm. The constant is a scalar or holds one value per channel of one axis
(`[C]`, `[C, 1, 1]`, ...). Consecutive steps whose intermediate tensors have no
other reader form a chain, composed into one `y = a ⊙ x + t` in float64
(`affine_math`), then folded by the affine-fold core (`affine_fold`):
backward into the Conv/ConvTranspose/Gemm/MatMul(+bias Add) producing x, or
forward into the Conv/Gemm/MatMul layers reading y. When a consumer zero-pads
and the chain shifts, only the scale folds and the shift stays as one Add
(reported as "partial"). This covers input standardisation (`(x - mean) / std`,
min-max scaling) before the first Conv and layer scale (`gamma * x`) after
the last Linear/Conv of a block. The factor 0.5 ending an erf GELU is left,
so that onnxruntime still fuses the GELU into one op; so are the steps of a
normalization left decomposed (a kind `fuse` was told to leave out, or the
speed check reverted), its γ and β included: onnxruntime fuses LayerNorm and
RMSNorm with them, and a kind left out should run as exported. Every chain
left is reported with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import onnx_graphsurgeon as gs

from normfold.ir.verbs import NameScope, NotConstant, constant_value, is_standard, only_consumer_is, producer, \
    walk_graphs
from normfold.passes import affine_math
from normfold.passes.affine_fold import Affine, fold_backward, fold_forward
from normfold.passes.batchnorm import BN, Skip
from normfold.passes.fold_bn import bn_as_affine
from normfold.passes.fuse.fuse_norms import unfused_norm_nodes
from normfold.report import EXCLUDED, PassReport

STEP_OPS = ("Mul", "Div", "Add", "Sub")
LEFT_IN_NORM = "part of a normalization left decomposed (onnxruntime fuses it with its γ/β)"


@dataclass
class Step:
    """One affine step: `node` applies `op` to its data input (index `data`) and `constant`."""

    node: gs.Node
    data: int
    constant: np.ndarray | None  # None for BN

    @property
    def x(self) -> gs.Tensor:
        return self.node.inputs[self.data]

    @property
    def y(self) -> gs.Tensor:
        return self.node.outputs[0]


def fold_affine(graph: gs.Graph, direction: str = "both", exclude: frozenset[str] = frozenset()) -> PassReport:
    """Fold every exactly-foldable chain of affine steps of `graph` (and its subgraphs) in place.

    direction: "both", "backward" (into the producer) or "forward" (into the consumers).
    exclude: names of nodes (a reported change's node) whose chain piece is left as it is.
    """
    if direction not in ("both", "backward", "forward"):
        raise ValueError(f"direction must be both, backward or forward, not {direction!r}")
    report = PassReport("fold-affine")
    names = NameScope(graph)
    for g, where in walk_graphs(graph):
        _fold_graph(g, graph.opset, names, direction, report, where, exclude)
    return report


def _fold_graph(graph: gs.Graph, opset: int, names: NameScope, direction: str, report: PassReport,
                where: str, exclude: frozenset[str]) -> None:
    reasons: dict[int, tuple[list[gs.Node], str]] = {}
    shifts: set[int] = set()  # the Add each partial fold leaves: what is left of a folded chain
    norms = [n for n in unfused_norm_nodes(graph, opset) if _step(n, opset) is not None]
    not_steps = {id(n) for n in norms}
    progress = True
    while progress:  # a fold can join or free other chains
        progress = False
        reasons.clear()
        for chain in _chains(graph, opset, shifts | not_steps):
            for steps, affine, reason in _pieces(graph, opset, chain):
                if affine is not None and any(step.node.name in exclude for step in steps):
                    affine, reason = None, EXCLUDED
                if affine is not None:
                    try:
                        into, how = _fold(graph, affine, names, direction,
                                          partial=len(steps) > 1 or steps[0].node.op == BN)
                    except Skip as why:
                        reason = str(why)
                if reason:
                    reasons[id(steps[0].node)] = ([s.node for s in steps], reason)
                    continue
                for step in steps:
                    report.changed(step.node.name, step.node.op, into, how, where)
                if how == "partial":
                    shifts.add(id(producer(affine.y)))
                progress = True
    for nodes, reason in [*reasons.values(), *(([n], LEFT_IN_NORM) for n in norms)]:
        for node in nodes:
            if node.outputs:
                report.skip(node.name, node.op, reason, where)
    graph.cleanup()


def _fold(graph, affine: Affine, names, direction: str, partial: bool) -> tuple[str, str]:
    failures = []
    if direction in ("both", "backward"):
        try:
            return fold_backward(graph, affine, names)
        except Skip as why:
            failures.append(f"backward: {why}")
    if direction in ("both", "forward"):
        try:
            return fold_forward(graph, affine, names, partial=partial)
        except Skip as why:
            failures.append(f"forward: {why}")
    raise Skip("; ".join(failures))


# --- finding chains -------------------------------------------------------------


def _step(node: gs.Node, opset: int) -> Step | None:
    """`node` as an affine step, or None."""
    if not is_standard(node) or len(node.outputs) < 1:
        return None
    if node.op == BN:
        return Step(node, 0, None)
    if node.op not in STEP_OPS or len(node.inputs) != 2 or len(node.outputs) != 1:
        return None
    values = []
    for tensor in node.inputs:
        try:
            values.append(constant_value(tensor, opset))
        except NotConstant:
            values.append(None)
    constants = [i for i, v in enumerate(values) if v is not None]
    if len(constants) != 1 or (node.op == "Div" and constants == [0]):  # x*y, constants only, or c/x
        return None
    return Step(node, 1 - constants[0], values[constants[0]])


def _next(graph: gs.Graph, step: Step, steps: dict[int, Step]) -> Step | None:
    """The step reading `step`'s output as its data, when nothing else reads it."""
    readers = step.y.outputs
    if len(readers) != 1 or not only_consumer_is(graph, step.y, readers[0]):
        return None
    following = steps.get(id(readers[0]))
    return following if following is not None and following.x is step.y else None


def _chains(graph: gs.Graph, opset: int, excluded: set[int]) -> list[list[Step]]:
    """Maximal chains of steps, in graph order; the bias Add of a MatMul and the
    nodes in `excluded` are not steps."""
    steps = {id(n): s for n in graph.nodes if id(n) not in excluded and (s := _step(n, opset)) is not None}
    successor = {id(s.node): _next(graph, s, steps) for s in steps.values()}
    followed = {id(n.node) for n in successor.values() if n is not None}
    chains = []
    for step in steps.values():
        if id(step.node) in followed:
            continue
        chain = [step]
        while (nxt := successor[id(chain[-1].node)]) is not None:
            chain.append(nxt)
        if _is_matmul_bias(graph, chain[0]):
            chain = chain[1:]
        if chain:
            chains.append(chain)
    return chains


def _is_matmul_bias(graph: gs.Graph, step: Step) -> bool:
    """Whether `step` adds a constant to the output of a MatMul read by nothing else (its bias)."""
    source = producer(step.x)
    return step.node.op == "Add" and source is not None and source.op == "MatMul" and \
        only_consumer_is(graph, step.x, step.node)


# --- composing a chain ----------------------------------------------------------


def _pieces(graph: gs.Graph, opset: int, chain: list[Step]) -> Iterator[tuple[list[Step], Affine | None, str]]:
    """`chain` cut into runs of steps that compose into one affine map:
    (steps, map, "") for each, (the step, None, reason) for a step that composes
    with nothing (not per-channel, division by zero, ...). Lazily, so that each
    run is composed after the one before it was folded."""
    while chain:
        x = chain[0].x
        rank = len(x.shape) if x.shape is not None else None
        a, t, axis, n, reason = np.ones(1), np.zeros(1), None, 0, ""
        for step in chain:
            try:
                step_axis, (a2, t2) = _apply(graph, opset, step, rank, a, t)
                axis2 = _same_axis(axis, step_axis, rank)
            except affine_math.NotFoldable as why:
                reason = f"{step.node.op} '{step.node.name}': {why}"
                break
            a, t, axis, n = a2, t2, axis2, n + 1
        if n == 0:
            yield chain[:1], None, reason
            chain = chain[1:]
        else:
            yield chain[:n], Affine([s.node for s in chain[:n]], x, chain[n - 1].y, a, t, axis), ""
            chain = chain[n:]


def _apply(graph, opset, step: Step, rank, a, t):
    """(axis, (a', t')) after `step`; raises NotFoldable."""
    if step.constant is None:
        try:
            bn = bn_as_affine(graph, step.node, opset)
        except Skip as why:
            raise affine_math.NotFoldable(str(why)) from None
        a, t = affine_math.then(a, t, "Mul", bn.s)
        return 1, affine_math.then(a, t, "Add", bn.t)
    if _is_gelu_factor(step):
        raise affine_math.NotFoldable("the factor of an erf GELU is left so that onnxruntime fuses the GELU "
                                      "into one op")
    axis, c = affine_math.channel_vector(step.constant, rank)
    return axis, affine_math.then(a, t, step.node.op, c, data_first=step.data == 0)


def _is_gelu_factor(step: Step) -> bool:
    """Whether `step` is the scalar Mul ending an erf GELU, `x·(1 + erf(x/√2))·0.5`
    (onnxruntime's Gelu fusion needs it there)."""
    product = producer(step.x)
    if step.node.op != "Mul" or step.constant.size != 1 or product is None or product.op != "Mul":
        return False
    adds = [p for p in map(producer, product.inputs) if p is not None and p.op == "Add"]
    return any(p is not None and p.op == "Erf" for add in adds for p in map(producer, add.inputs))


def _same_axis(axis: int | None, other: int | None, rank: int | None) -> int | None:
    """The common channel axis of two steps (None: scalar); raises NotFoldable if they differ."""
    if axis is None or other is None:
        return other if axis is None else axis
    if rank is not None:
        axis, other = axis % rank - rank, other % rank - rank
    if axis != other:
        raise affine_math.NotFoldable(f"steps act on different axes ({axis} and {other})")
    return axis

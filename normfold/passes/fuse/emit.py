"""Putting one fused normalization node in place of a matched subgraph.

Each kind can be written as a `com.normfold` op (custom) or, where the
model's opset has one, as the standard ONNX op; `--target auto` picks per kind
what runs fastest in onnxruntime. Both facts are the op table's
(`normfold.ops.table`); a channel-first LayerNorm has no standard op.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from normfold.ir.verbs import NameScope, detach
from normfold.ops.table import DOMAIN, OPS
from normfold.passes.matching import NoMatch, retarget_type_readers

TARGETS = ("auto", "custom", "standard")


@dataclass
class FusedNorm:
    """A matched normalization subgraph and the single op that replaces it.

    `params` are the op's tensor inputs after X, in order (None: left out);
    `activation_nodes` (a trailing SiLU) are absorbed only by the custom op.
    """

    kind: str
    family: str  # the --ops name: gn, ln, rms, frn, wn
    x: gs.Tensor
    out: gs.Tensor
    nodes: list[gs.Node]
    params: list[np.ndarray | None]
    attrs: dict
    label: str = ""  # variant, e.g. "channel-first", "+SiLU"
    activation_nodes: list[gs.Node] = field(default_factory=list)
    activation_out: gs.Tensor | None = None
    left: list[tuple[gs.Node, str]] = field(default_factory=list)

    @property
    def describe(self) -> str:
        """e.g. 'LayerNorm (channel-first)'."""
        return f"{self.kind} ({self.label})" if self.label else self.kind

    @property
    def channel_first(self) -> bool:
        return bool(self.attrs.get("channel_first", 0))


def standard_op(fused: FusedNorm, opset: int) -> str | None:
    """The standard op that can replace `fused` at `opset`, or None; raises
    NoMatch with the reason when none can."""
    standard = OPS[fused.kind].standard
    if standard is None or fused.channel_first:
        raise NoMatch(f"ONNX has no standard op for {fused.describe}")
    op, since = standard
    if opset < since:
        raise NoMatch(f"opset {opset} has no {op} (needs opset {since})")
    return op


def choose(fused: FusedNorm, target: str, opset: int) -> str:
    """'custom' or 'standard' for `fused` under `target`; NoMatch if impossible."""
    if target == "custom":
        return "custom"
    if target == "standard":
        try:
            standard_op(fused, opset)
        except NoMatch as why:
            raise NoMatch(f"--target standard: {why}; use --target custom or auto") from None
        return "standard"
    if OPS[fused.kind].auto_standard:
        try:
            standard_op(fused, opset)
            return "standard"
        except NoMatch:
            pass
    return "custom"


def emit(graph: gs.Graph, names: NameScope, fused: FusedNorm, target: str, opset: int) -> tuple[str, list[gs.Node]]:
    """Replace `fused.nodes` (and its activation, when the op absorbs it) by one
    node; returns what it became ('com.normfold.GroupNorm', 'LayerNormalization')
    and the nodes it replaced."""
    how = choose(fused, target, opset)
    dtype = _element_type(fused)
    params = [None if p is None else names.constant(f"{fused.out.name}_{i}", p.astype(dtype))
              for i, p in enumerate(_with_neutral_params(fused), start=1)]
    nodes, out = fused.nodes, fused.out
    if how == "custom" or not fused.activation_nodes:
        nodes, out = nodes + fused.activation_nodes, fused.activation_out or out
    else:
        fused.label = "SiLU kept as Sigmoid+Mul"
    if how == "custom":
        op, domain, attrs, inputs = fused.kind, DOMAIN, fused.attrs, params
    else:
        op, domain, attrs, inputs = _as_standard(fused, params, opset, names, dtype)
    while inputs and inputs[-1] is None:
        inputs = inputs[:-1]
    if any(i is None for i in inputs):
        raise AssertionError(f"{op}: an optional input in the middle is missing")
    replaced = [(n.op, n.name) for n in nodes]
    retarget_type_readers(nodes, fused.x)
    detach(nodes)
    graph.nodes.append(gs.Node(op, names.fresh(f"{out.name}_{fused.kind}"), attrs, [fused.x, *inputs], [out],
                               domain=domain))
    return (f"{DOMAIN}.{op}" if domain == DOMAIN else op), replaced


def _as_standard(fused: FusedNorm, params, opset, names, dtype):
    op = standard_op(fused, opset)
    rank = len(fused.x.shape)
    if fused.kind == "GroupNorm":
        attrs = {"num_groups": fused.attrs["num_groups"], "epsilon": fused.attrs["epsilon"]}
    else:
        attrs = {"axis": fused.attrs.get("axis", -1) % rank, "epsilon": fused.attrs["epsilon"]}
    if any(p is None for p in params):
        raise NoMatch(f"{op} needs every parameter, and the shape of '{fused.x.name}' is not static")
    return op, "", attrs, params


def _with_neutral_params(fused: FusedNorm) -> list[np.ndarray | None]:
    """`fused.params` with each left-out optional one as its neutral value (the op
    table's), shaped like the op's first parameter (RMSNorm: like the normalized
    axes, if static): every input is then present, as RMSNormalization and the
    portable function bodies need."""
    params = list(fused.params)
    for i, neutral in enumerate(OPS[fused.kind].neutral):
        if neutral is None or params[i] is not None:
            continue
        if i > 0:
            params[i] = np.full(np.shape(params[0]), neutral, np.float64)
        elif all(isinstance(d, int) for d in fused.x.shape[fused.attrs["axis"]:]):
            params[i] = np.full(fused.x.shape[fused.attrs["axis"]:], neutral, np.float64)
    return params


def _element_type(fused: FusedNorm) -> np.dtype:
    """numpy type of X (so the parameters match it)."""
    dtype = fused.x.dtype
    if isinstance(dtype, int):
        return onnx.helper.tensor_dtype_to_np_dtype(dtype)
    if dtype is None:
        raise NoMatch(f"element type of '{fused.x.name}' is unknown")
    return np.dtype(dtype)

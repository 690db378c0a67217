"""Adds fused into the norm that reads them, so the data is read once:

- a residual add, `Add(a, b) → com.normfold.LayerNorm / RMSNorm` over the last axes, a and b
  computed tensors of one shape (the pre-norm and post-norm transformer block), becomes
  `SkipLayerNorm` / `SkipRMSNorm`; when anything else reads the sum (the residual stream goes
  on) or it is a graph output, `SkipLayerNormSum` / `SkipRMSNormSum`, which also write the sum,
  under the same name;
- a per-sample, per-channel add, `Add(x, t) → com.normfold.GroupNorm` with t computed and of
  shape [N, C, 1, ...] (the time embedding of a diffusion ResNet block), read by the GroupNorm
  alone, becomes `BiasGroupNorm`.

A Cast of the sum to its own type between the add and the norm (`x.float()` of a float x) is
looked through and removed.

Runs after the norms are fused, on the `com.normfold` nodes they became, and (unless the target
is "standard") on standard `LayerNormalization` nodes (exported, or written by `--target auto` at
opset ≥ 17) with a float stash type, no Mean/InvStdDev output read and a scale (and bias) of one
value per normalized element: onnxruntime fuses such an add into its own SkipLayerNormalization,
which on its CPU provider takes 5–10x the time of normfold's SkipLayerNorm
(`benchmarks/RESULTS_call_overhead.md`, `RESULTS_ops.md`).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from normfold.ir.verbs import NameScope, consumers, detach, is_constant, is_observable, is_standard, producer
from normfold.ops.table import DOMAIN, OPS
from normfold.passes.matching import same_dims
from normfold.report import PassReport

SKIP_OPS = {"LayerNorm": "SkipLayerNorm", "RMSNorm": "SkipRMSNorm"}


def fuse_adds(graph: gs.Graph, opset: int, families: set[str], names: NameScope, report: PassReport,
              where: str = "", exclude: frozenset[str] = frozenset(), standard_norms: bool = True) -> None:
    """Fuse each add described above into the norm of `graph` that reads it, for the --ops
    `families` given (`standard_norms`: standard LayerNormalization nodes too); record each in
    `report` (under the Add's name; adds named in `exclude` are left)."""
    graph.cleanup()  # dead nodes of the fused subgraphs would count as readers of the sum
    for norm in list(graph.nodes):
        standard = standard_norms and "ln" in families and _standard_layer_norm(graph, norm, opset)
        if not standard and (norm.domain != DOMAIN or norm.op not in (*SKIP_OPS, "GroupNorm") or not norm.outputs
                             or OPS[norm.op].family not in families or norm.attrs.get("channel_first", 0)):
            continue
        total = norm.inputs[0]
        add, reader, cast = producer(total), norm, []
        if _is_identity_cast(add) and not is_observable(graph, total) and consumers(total) == [norm]:
            cast, reader, total = [add], add, add.inputs[0]  # x.float() of a float x: looked through
            add = producer(total)
        if add is None or add.op != "Add" or not is_standard(add) or len(add.inputs) != 2 or add.name in exclude:
            continue
        a, b = add.inputs
        if is_constant(a, opset) or is_constant(b, opset):
            continue  # a bias add
        read_elsewhere = is_observable(graph, total) or any(r is not reader for r in consumers(total))
        if norm.op == "GroupNorm":
            if read_elsewhere or not (_per_channel(b, total) and same_dims(a, total)):
                a, b = b, a
                if read_elsewhere or not (_per_channel(b, total) and same_dims(a, total)):
                    continue
            op, how, outputs = "BiasGroupNorm", "per-channel add", [norm.outputs[0]]
        elif same_dims(a, b) and same_dims(a, total):
            op = SKIP_OPS["LayerNorm" if standard else norm.op] + ("Sum" if read_elsewhere else "")
            how = "residual add" + (", sum output" if read_elsewhere else "")
            outputs = [norm.outputs[0], *([total] if read_elsewhere else [])]
        else:
            continue
        if standard:
            attrs = {"axis": int(norm.attrs.get("axis", -1)), "epsilon": float(norm.attrs.get("epsilon", 1e-5))}
        else:
            attrs = {k: v for k, v in norm.attrs.items() if k != "channel_first"}
        params = _parameters(norm)
        fused = gs.Node(op, names.fresh(f"{norm.outputs[0].name}_{op}"), attrs, [a, b, *params], [], domain=DOMAIN)
        detach([add, *cast, norm])
        fused.outputs.extend(outputs)
        graph.nodes.append(fused)
        report.changed(add.name, f"Add+{norm.op}", f"{DOMAIN}.{op}", how, where)


def _standard_layer_norm(graph: gs.Graph, node: gs.Node, opset: int) -> bool:
    """Whether `node` is a standard LayerNormalization SkipLayerNorm computes: float stash type, only
    Y read, scale (and bias) constant with one value per element of the normalized axes."""
    if node.op != "LayerNormalization" or not is_standard(node) or not node.outputs or \
            int(node.attrs.get("stash_type", 1)) != 1:
        return False
    if any(out.outputs or is_observable(graph, out) for out in node.outputs[1:] if out.name):
        return False  # Mean or InvStdDev is read
    x = node.inputs[0]
    if x.shape is None:
        return False
    axis = int(node.attrs.get("axis", -1)) % max(len(x.shape), 1)
    normalized = x.shape[axis:]
    if not all(isinstance(d, int) and d > 0 for d in normalized):
        return False
    count = int(np.prod(normalized))
    params = _parameters(node)
    return all(is_constant(t, opset) and t.shape is not None and int(np.prod(t.shape)) == count for t in params)


def _is_identity_cast(node: gs.Node | None) -> bool:
    """Whether `node` is a Cast to its input's own element type (a no-op the exporters write)."""
    if node is None or node.op != "Cast" or not is_standard(node) or node.inputs[0].dtype is None:
        return False
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(node.attrs.get("to", 0))) == np.dtype(node.inputs[0].dtype)


def _per_channel(t: gs.Tensor, x: gs.Tensor) -> bool:
    """Whether `t` is known to be [N, C, 1, ...] for `x` of shape [N, C, ...]."""
    if t.shape is None or x.shape is None or len(t.shape) != len(x.shape) or len(x.shape) < 2:
        return False
    head = all(d is not None and d == e and (not isinstance(d, int) or d >= 0) for d, e in zip(t.shape[:2], x.shape))
    return head and all(d == 1 for d in t.shape[2:])


def _parameters(norm: gs.Node) -> list[gs.Tensor]:
    """The norm's inputs after X that are given (LayerNormalization's bias may be given as "")."""
    return [t for t in norm.inputs[1:] if t.name]

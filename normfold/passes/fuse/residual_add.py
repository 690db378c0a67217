"""A residual add fused into the norm that reads it: `Add(a, b) → com.normfold.LayerNorm /
RMSNorm` over the last axes, a and b computed tensors of one shape (the pre-norm and post-norm
transformer block), becomes `SkipLayerNorm` / `SkipRMSNorm`, which reads a and b once. When
anything else reads the sum (the residual stream goes on) or it is a graph output, it becomes
`SkipLayerNormSum` / `SkipRMSNormSum`, which also writes the sum, under the same name.

Runs after the norms are fused, on the `com.normfold` nodes they became; a standard
`LayerNormalization` is left to onnxruntime, which fuses the add into it itself.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from normfold.ir.verbs import NameScope, consumers, detach, is_constant, is_observable, producer
from normfold.ops.table import DOMAIN, OPS
from normfold.passes.matching import same_dims
from normfold.report import PassReport

SKIP_OPS = {"LayerNorm": "SkipLayerNorm", "RMSNorm": "SkipRMSNorm"}


def fuse_residual_adds(graph: gs.Graph, opset: int, families: set[str], names: NameScope, report: PassReport,
                       where: str = "") -> None:
    """Fuse each residual Add into the com.normfold LayerNorm/RMSNorm of `graph` that reads it
    (not into channel-first LayerNorm), for the --ops `families` given; record each in `report`."""
    for norm in list(graph.nodes):
        if norm.domain != DOMAIN or norm.op not in SKIP_OPS or OPS[norm.op].family not in families \
                or norm.attrs.get("channel_first", 0) or not norm.outputs:
            continue
        total = norm.inputs[0]
        add = producer(total)
        if add is None or add.op != "Add" or add.domain not in (None, "", "ai.onnx") or len(add.inputs) != 2:
            continue
        a, b = add.inputs
        if is_constant(a, opset) or is_constant(b, opset) or not (same_dims(a, b) and same_dims(a, total)):
            continue  # a bias add, or a broadcast
        read_elsewhere = is_observable(graph, total) or any(r is not norm for r in consumers(total))
        op = SKIP_OPS[norm.op] + ("Sum" if read_elsewhere else "")
        attrs = {k: v for k, v in norm.attrs.items() if k != "channel_first"}
        outputs = [norm.outputs[0], *([total] if read_elsewhere else [])]
        fused = gs.Node(op, names.fresh(f"{norm.outputs[0].name}_{op}"), attrs, [a, b, *norm.inputs[1:]],
                        [], domain=DOMAIN)
        detach([add, norm])
        fused.outputs.extend(outputs)
        graph.nodes.append(fused)
        report.changed(add.name, f"Add+{norm.op}", f"{DOMAIN}.{op}",
                       "residual add" + (", sum output" if read_elsewhere else ""), where)

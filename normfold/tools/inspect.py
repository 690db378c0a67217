"""`inspect`: what a model needs to run (the Python API behind `normfold inspect`)."""

from __future__ import annotations

import os

from normfold.ir.convert import all_graphs, count_ops
from normfold.io.model_io import load_model
from normfold.ops.portable import needs_library_for
from normfold.ops.table import DOMAIN


def inspect_model(path: str | os.PathLike) -> dict:
    """IR version, opsets, op counts, com.normfold ops and model-local functions of
    the model at `path`, and whether it runs without normfold's library."""
    model = load_model(path, weights=False).model  # the structure is enough
    ops = count_ops(model.graph)
    functions = {(f.domain, f.name) for f in model.functions}
    custom = sorted({n.op_type for g in all_graphs(model.graph) for n in g.node if n.domain == DOMAIN})
    without_body = needs_library_for(model)
    return {
        "model": str(path),
        "ir_version": model.ir_version,
        "opsets": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "nodes": sum(ops.values()),
        "ops": dict(sorted(ops.items())),
        "normfold_ops": custom,
        "functions": [f"{d}.{n}" for d, n in sorted(functions)],
        "runs_without_library": not without_body,
        "needs_library_for": without_body,
    }

"""`inspect`: what a model needs to run (the Python API behind `normfold inspect`)."""

from __future__ import annotations

import os

from normfold.ir.convert import all_graphs, count_ops
from normfold.io.model_io import load_model
from normfold.ops.table import DOMAIN


def inspect_model(path: str | os.PathLike) -> dict:
    """IR version, opsets, op counts, com.normfold ops and model-local functions of
    the model at `path`, and whether it runs without normfold's library."""
    model = load_model(path, weights=False).model  # the structure is enough
    ops = count_ops(model.graph)
    functions = {(f.domain, f.name) for f in model.functions}
    custom = sorted({n.op_type for g in all_graphs(model.graph) for n in g.node if n.domain == DOMAIN})
    without_body = [op for op in custom if (DOMAIN, op) not in functions]
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


def format_inspection(report: dict) -> str:
    """Human-readable form of `inspect_model`'s report."""
    opsets = ", ".join(f"{d} {v}" for d, v in report["opsets"].items())
    lines = [f"{report['model']}: IR {report['ir_version']}, opsets {opsets}, {report['nodes']} nodes",
             "ops: " + ", ".join(f"{op} x{n}" for op, n in report["ops"].items())]
    if report["normfold_ops"]:
        lines.append(f"{DOMAIN} ops: {', '.join(report['normfold_ops'])}")
    lines.append("functions: " + (", ".join(report["functions"]) or "none"))
    if not report["normfold_ops"]:
        lines.append("runs in any onnxruntime (no normfold ops)")
    elif report["runs_without_library"]:
        lines.append("portable: every normfold op carries its function body; runs with or without normfold's "
                     "library")
    else:
        lines.append(f"needs normfold's library (normfold.ops_library_path()) for: "
                     f"{', '.join(report['needs_library_for'])}; `normfold fuse --portable` adds the bodies")
    return "\n".join(lines)

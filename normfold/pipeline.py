"""Running graph passes on in-memory models: the Python API behind the CLI."""

from __future__ import annotations

from typing import Callable

import onnx
import onnx_graphsurgeon as gs

from .graph import export_model, import_graph
from .report import PassReport

GraphPass = Callable[..., PassReport]


def run_pass(model: onnx.ModelProto, graph_pass: GraphPass, **options) -> tuple[onnx.ModelProto, PassReport]:
    """Apply `graph_pass(graph, **options)` to `model`; return the new model and the report.
    `model` itself is not modified."""
    graph: gs.Graph = import_graph(model)
    report = graph_pass(graph, **options)
    return export_model(graph, like=model), report


def fold_bn(
    model: onnx.ModelProto, *, direction: str = "both", standalone: str = "keep"
) -> tuple[onnx.ModelProto, PassReport]:
    """Fold every exactly-foldable inference BatchNormalization of `model` into its
    neighbouring Conv/ConvTranspose/Gemm/MatMul.

    direction: "backward" (into the producer), "forward" (into the consumers) or "both".
    standalone: "keep" leaves unfoldable BN as is, "affine" rewrites it as Mul+Add.
    Returns (new model, report); `model` is not modified.
    """
    from .passes.fold_bn import fold_bn as fold_bn_pass

    return run_pass(model, fold_bn_pass, direction=direction, standalone=standalone)


def fuse(model: onnx.ModelProto, *, ops=("gn", "ln", "rms", "frn", "wn"), target: str = "auto",
         portable: bool = True) -> tuple[onnx.ModelProto, PassReport]:
    """Replace the normalization subgraphs of `model` (GroupNorm, LayerNorm, RMSNorm,
    Filter Response Norm, weight norm) with one op each.

    ops: kinds to fuse; target: "custom" (com.normfold ops, run with the library of
    `normfold.ops_library_path()`), "standard" (ONNX ops where the opset has them) or
    "auto" (per kind, the faster in onnxruntime). portable: embed a standard-ONNX
    function body for each com.normfold op used (`normfold.portable`), so the model
    also runs without the library (`model.functions`; nodes no body can serve are
    listed among the report's skips). Returns (new model, report).
    """
    from .passes.fuse_norms import fuse_norms

    return _portable(*run_pass(model, fuse_norms, ops=tuple(ops), target=target), portable)


def fold_wn(model: onnx.ModelProto, *, portable: bool = True) -> tuple[onnx.ModelProto, PassReport]:
    """Compute weight norm, weight standardisation and cosine-normalised weights on
    constant layer weights offline; runtime weight norm becomes com.normfold.WeightNorm
    (with its function body when `portable`). Returns (new model, report)."""
    from .passes.fold_weight_norm import fold_weight_norm

    return _portable(*run_pass(model, fold_weight_norm), portable)


def _portable(model: onnx.ModelProto, report: PassReport, portable: bool) -> tuple[onnx.ModelProto, PassReport]:
    """`model` with the function bodies of its com.normfold ops when `portable`; the
    nodes no body can serve are added to `report`'s skips."""
    if portable:
        from .portable import embed_functions

        report.skipped += embed_functions(model).skipped
    return model, report

"""The Python API: normfold's passes on in-memory models.

Each function runs registered passes (`normfold.passes.registry`) through the
one runner (`normfold.pipeline.runner`), as the commands do, and returns the
new model with the report(s); the model given is never modified.
"""

from __future__ import annotations

import onnx

from normfold.errors import NormfoldError
from normfold.passes.recalibrate import RecalibrationReport
from normfold.ops.table import FAMILIES
from normfold.passes.registry import GRAPH_PASSES, FUSE_FAMILIES, GraphPass, steps
from normfold.pipeline.runner import combined, run_passes
from normfold.progress import Progress
from normfold.report import PassReport


def run_pass(model: onnx.ModelProto, graph_pass: GraphPass, **options) -> tuple[onnx.ModelProto, PassReport]:
    """Apply `graph_pass(graph, **options)` to `model`; return the new model and the report.
    `model` itself is not modified."""
    run = run_passes(model, [(graph_pass, options)])
    return run.model, run.reports[0]


def fold_bn(
    model: onnx.ModelProto, *, direction: str = "both", standalone: str = "keep"
) -> tuple[onnx.ModelProto, PassReport]:
    """Fold every exactly-foldable inference BatchNormalization of `model` into its
    neighbouring Conv/ConvTranspose/Gemm/MatMul.

    direction: "backward" (into the producer), "forward" (into the consumers) or "both".
    standalone: "keep" leaves unfoldable BN as is, "affine" rewrites it as Mul+Add.
    Returns (new model, report); `model` is not modified.
    """
    run = run_passes(model, steps(("fold-bn",), direction=direction, standalone=standalone))
    return run.model, run.reports[0]


def fold_affine(model: onnx.ModelProto, *, direction: str = "both") -> tuple[onnx.ModelProto, PassReport]:
    """Fold every exactly-foldable chain of per-channel Mul/Div/Add/Sub by constants
    (and inference BatchNorm) of `model` into its neighbouring Conv/ConvTranspose/Gemm/MatMul:
    input standardisation, layer scale, Mul->Add chains. A chain before a Conv that
    zero-pads folds its scale only and keeps its shift as one Add ("partial").

    direction: "backward" (into the producer), "forward" (into the consumers) or "both".
    Returns (new model, report); `model` is not modified.
    """
    run = run_passes(model, steps(("fold-affine",), direction=direction))
    return run.model, run.reports[0]


def fuse(model: onnx.ModelProto, *, ops=FAMILIES, target: str = "auto",
         portable: bool = True) -> tuple[onnx.ModelProto, PassReport]:
    """Replace the normalization subgraphs of `model` (GroupNorm, LayerNorm, RMSNorm,
    Filter Response Norm, weight norm) with one op each.

    ops: kinds to fuse; target: "custom" (com.normfold ops, run with the library of
    `normfold.ops_library_path()`), "standard" (ONNX ops where the opset has them) or
    "auto" (per kind, the faster in onnxruntime). portable: embed a standard-ONNX
    function body for each com.normfold op used (`normfold.ops.portable`), so the model
    also runs without the library (`model.functions`; nodes no body can serve are
    listed among the report's skips). Returns (new model, report).
    """
    run = run_passes(model, steps(("fuse",), ops=tuple(ops), target=target), portable=portable)
    return run.model, combined(run.reports)


def fold_wn(model: onnx.ModelProto, *, portable: bool = True) -> tuple[onnx.ModelProto, PassReport]:
    """Compute weight norm, weight standardisation and cosine-normalised weights on
    constant layer weights offline; runtime weight norm becomes com.normfold.WeightNorm
    (with its function body when `portable`). Returns (new model, report)."""
    run = run_passes(model, steps(("fold-wn",)), portable=portable)
    return run.model, combined(run.reports)


def recalibrate(model: onnx.ModelProto, data, *, progress: bool = False
                ) -> tuple[onnx.ModelProto, RecalibrationReport]:
    """AdaBN: re-estimate the BatchNorm statistics of `model` on `data`.

    data: an `.npz` path, a folder of `.npz` files (one batch each), or a list
    of {input name: array} dicts. Each BN's statistics are measured with the
    BNs before it already recalibrated. Returns (new model, report); `model`
    is not modified. Fold afterwards with `normfold.fold_bn`.
    """
    run = run_passes(model, steps(("recalibrate",), data=data, progress=Progress(enabled=progress)))
    return run.model, run.reports[0]


def optimize(model: onnx.ModelProto, *, passes: tuple[str, ...] = GRAPH_PASSES, target: str = "auto",
             portable: bool = True) -> tuple[onnx.ModelProto, list[PassReport]]:
    """Run normfold's graph passes on `model` in PASS_ORDER; return (new model, reports).

    passes: a subset of fold-wn, fold-bn, fuse, fold-affine, cleanup; target: see `normfold.fuse`.
    portable: embed a standard-ONNX function body for each com.normfold op used,
    so the model also runs where normfold's library is not loaded.
    No verification here: `normfold optimize` (`normfold.pipeline.files.optimize_file`)
    verifies what it writes. `model` is not modified.
    """
    if "recalibrate" in passes:
        raise NormfoldError("recalibrate needs calibration data: use normfold.recalibrate first")
    run = run_passes(model, steps(tuple(p for p in GRAPH_PASSES if p in passes), ops=FUSE_FAMILIES, target=target),
                     portable=portable)
    return run.model, run.reports

"""`optimize`: every normfold pass in a sensible order (the Python API behind
`normfold optimize`).

    recalibrate  AdaBN: BatchNorm statistics re-estimated on target data (only with data)
    fold-wn      weight norm / standardisation / cosine-normalised weights computed offline,
                 first, so that the weights BatchNorm folds into are constants
    fold-bn      BatchNorm folded into neighbouring Conv/ConvTranspose/Gemm/MatMul
    fuse         GroupNorm, LayerNorm, RMSNorm and FRN subgraphs replaced by one op each
    cleanup      Identity / inference Dropout and dead code removed
"""

from __future__ import annotations

import onnx

from .errors import NormfoldError
from .pipeline import GraphPass
from .report import PassReport

PASS_ORDER = ("recalibrate", "fold-wn", "fold-bn", "fuse", "cleanup")
GRAPH_PASSES = PASS_ORDER[1:]
FUSE_KINDS = ("gn", "ln", "rms", "frn")  # weight norm is fold-wn's


def parse_passes(text: str | None, with_data: bool = False) -> tuple[str, ...]:
    """The passes of a comma-separated `--passes` value, in PASS_ORDER. None: all of
    them, recalibrate included only `with_data`; recalibrate and data go together."""
    if text is None:
        return PASS_ORDER if with_data else GRAPH_PASSES
    names = {p.strip() for p in text.split(",") if p.strip()}
    unknown = sorted(names - set(PASS_ORDER))
    if unknown or not names:
        raise NormfoldError(f"--passes: unknown pass(es) {', '.join(unknown) or '(none given)'}; "
                            f"choose from {', '.join(PASS_ORDER)}")
    if ("recalibrate" in names) != with_data:
        raise NormfoldError("--passes recalibrate and --data CALIB go together: give both or neither")
    return tuple(p for p in PASS_ORDER if p in names)


def graph_passes(names: tuple[str, ...], target: str = "auto") -> list[tuple[GraphPass, dict]]:
    """The graph-pass functions and options for the pass `names` (recalibrate excluded: it needs data)."""
    from .passes.cleanup import cleanup
    from .passes.fold_bn import fold_bn
    from .passes.fold_weight_norm import fold_weight_norm
    from .passes.fuse_norms import fuse_norms

    table = {
        "fold-wn": (fold_weight_norm, {}),
        "fold-bn": (fold_bn, {"direction": "both", "standalone": "keep"}),
        "fuse": (fuse_norms, {"ops": FUSE_KINDS, "target": target}),
        "cleanup": (cleanup, {}),
    }
    return [table[name] for name in names if name in table]


def optimize(model: onnx.ModelProto, *, passes: tuple[str, ...] = GRAPH_PASSES, target: str = "auto",
             portable: bool = True) -> tuple[onnx.ModelProto, list[PassReport]]:
    """Run normfold's graph passes on `model` in PASS_ORDER; return (new model, reports).

    passes: a subset of fold-wn, fold-bn, fuse, cleanup; target: see `normfold.fuse`.
    portable: embed a standard-ONNX function body for each com.normfold op used,
    so the model also runs where normfold's library is not loaded.
    No verification here: `normfold optimize` (`commands.optimize_file`) verifies
    what it writes. `model` is not modified.
    """
    from .graph import export_model, import_graph
    from .portable import embedded

    if "recalibrate" in passes:
        raise NormfoldError("recalibrate needs calibration data: use normfold.recalibrate first")
    graph = import_graph(model)
    reports = [graph_pass(graph, **options) for graph_pass, options in graph_passes(tuple(passes), target)]
    result = export_model(graph, like=model)
    if portable:
        reports += embedded(result)
    return result, reports

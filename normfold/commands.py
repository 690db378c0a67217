"""File-level commands: load a model, run passes, write the result, summarise."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from typing import Callable

import onnx

from .graph import count_ops, export_detached, import_graph
from .model_io import load_model, save_model
from .portable import embedded
from .progress import Progress
from .pipeline import GraphPass
from .report import PassReport
from .verify_report import VerifyReport


@dataclass
class RunSummary:
    """Before/after facts of one command run on one model file."""

    input: Path
    output: Path
    ops_before: Counter
    ops_after: Counter
    bytes_before: int
    bytes_after: int
    reports: list[PassReport] = field(default_factory=list)
    watched_ops: tuple[str, ...] = ("BatchNormalization",)
    verification: VerifyReport | None = None

    def watch(self, ops: tuple[str, ...]) -> None:
        """Show the counts of those of `ops` present before or after."""
        self.watched_ops = tuple(dict.fromkeys(op for op in ops if self.ops_before.get(op) or self.ops_after.get(op)))

    @property
    def written(self) -> bool:
        """Whether the output was written (a failed verification refuses it)."""
        return self.verification is None or self.verification.passed

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {
            "input": str(self.input),
            "output": str(self.output),
            "nodes_before": sum(self.ops_before.values()),
            "nodes_after": sum(self.ops_after.values()),
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "ops_before": {op: self.ops_before.get(op, 0) for op in self.watched_ops},
            "ops_after": {op: self.ops_after.get(op, 0) for op in self.watched_ops},
            "passes": [r.to_dict() for r in self.reports],
            "written": self.written,
            **({"verification": self.verification.to_dict()} if self.verification else {}),
        }


def fold_bn_file(model_path: Path, out: Path, *, inplace: bool, direction: str, standalone: str,
                 progress: Progress | None = None) -> RunSummary:
    """`normfold fold-bn` on files: fold, write atomically, summarise."""
    from .passes.fold_bn import fold_bn

    return rewrite_file(model_path, out, inplace, [(fold_bn, {"direction": direction, "standalone": standalone})],
                        progress=progress)


def fuse_file(model_path: Path, out: Path, *, inplace: bool, ops: tuple[str, ...], target: str,
              portable: bool = True, progress: Progress | None = None) -> RunSummary:
    """`normfold fuse` on files: fuse, embed function bodies, write atomically, summarise."""
    from .passes.fuse_norms import fuse_norms

    summary = rewrite_file(model_path, out, inplace, [(fuse_norms, {"ops": ops, "target": target})],
                           portable=portable, progress=progress)
    summary.watch(FUSE_WATCHED)
    return summary


def fold_wn_file(model_path: Path, out: Path, *, inplace: bool, portable: bool = True,
                 progress: Progress | None = None) -> RunSummary:
    """`normfold fold-wn` on files: weight-side folds, write atomically, summarise."""
    from .passes.fold_weight_norm import fold_weight_norm

    summary = rewrite_file(model_path, out, inplace, [(fold_weight_norm, {})], portable=portable, progress=progress)
    summary.watch(WEIGHT_WATCHED)
    return summary


# ops of the weight-side subgraphs, and what replaces a runtime weight norm
WEIGHT_WATCHED = ("ReduceL2", "LpNormalization", "ReduceMean", "Sqrt", "Div", "WeightNorm")


# ops whose counts show what fusing did: the decomposed pieces and the fused ops
FUSE_WATCHED = ("InstanceNormalization", "ReduceMean", "ReduceL2", "Sqrt", "GroupNormalization",
                "LayerNormalization", "RMSNormalization", "GroupNorm", "LayerNorm", "RMSNorm",
                "FilterResponseNorm", "WeightNorm")


def rewrite_file(model_path: Path, out: Path, inplace: bool, passes: list[tuple[GraphPass, dict]], *,
                 portable: bool = False, before_commit: Callable[[Path], bool] | None = None,
                 prepare: Callable[[onnx.ModelProto], tuple[onnx.ModelProto, PassReport]] | None = None,
                 progress: Progress | None = None) -> RunSummary:
    """Load `model_path`, apply `passes` in order, write `out`, summarise. Weights
    no pass changed are never copied in memory.

    prepare: a model-level step run before the graph passes (recalibration).
    portable: embed function bodies for the com.normfold ops used (`normfold.portable`).
    before_commit: called with the staged output; False refuses it (nothing written).
    progress: reports the long steps (loading, each pass, writing).
    """
    progress = progress or Progress()
    with progress.step(f"loading {model_path.name}"):
        loaded = load_model(model_path)
    reports = []
    model = loaded.model
    if prepare is not None:
        model, report = prepare(model)
        reports.append(report)
    with progress.step("reading the graph"):
        graph = import_graph(model)
    for graph_pass, options in passes:
        with progress.step(graph_pass.__name__.replace("_", "-")):
            reports.append(graph_pass(graph, **options))
    with progress.step("building the output model"):
        result, detached = export_detached(graph, like=model)
        if portable:
            reports += embedded(result)
    with progress.step(f"writing {out.name}"):
        written = save_model(
            result, out, source=loaded.path, protect=loaded.external_files, inplace=inplace,
            external_data=True if loaded.had_external_data else None, detached=detached,
            before_commit=before_commit,
        )
    return RunSummary(
        input=model_path, output=out,
        ops_before=count_ops(loaded.model.graph), ops_after=count_ops(result.graph),
        bytes_before=loaded.file_bytes, bytes_after=written, reports=reports,
    )


def optimize_file(model_path: Path, out: Path, *, inplace: bool, passes: tuple[str, ...], target: str = "auto",
                  portable: bool = True, calibration=None, verify_options: dict | None = None,
                  progress: Progress | None = None) -> RunSummary:
    """`normfold optimize` on files: every selected pass, then verification of the
    written bytes against the input model (or, after recalibration, against the
    recalibrated model); a model that fails verification is not written.

    verify_options: keyword arguments of `normfold.verify.verify` (inputs, shapes,
    seed, samples, atol, rtol); None skips verification.
    """
    from .optimizer import graph_passes
    from .verify import verify

    progress = progress or Progress()
    reference: Path | onnx.ModelProto = model_path
    verification: VerifyReport | None = None

    def recalibrated(model: onnx.ModelProto) -> tuple[onnx.ModelProto, PassReport]:
        from .adabn import recalibrate

        nonlocal reference
        reference, report = recalibrate(model, calibration, progress=progress.enabled)
        return reference, report

    def verified(staged: Path) -> bool:
        nonlocal verification
        verification = verify(staged, reference, progress=progress, **verify_options)
        verification.candidate = str(out)
        return verification.passed

    summary = rewrite_file(
        model_path, out, inplace, graph_passes(passes, target), portable=portable,
        prepare=recalibrated if "recalibrate" in passes else None,
        before_commit=verified if verify_options is not None else None, progress=progress,
    )
    summary.watch(("BatchNormalization", "Identity", "ReduceL2") + FUSE_WATCHED)
    summary.verification = verification
    return summary

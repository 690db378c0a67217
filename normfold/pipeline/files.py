"""File-level commands: load a model, run passes, write the result, summarise."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from typing import Callable

import onnx

from normfold.io.model_io import load_model, save_model
from normfold.ir.convert import count_ops
from normfold.passes.registry import FUSE_FAMILIES, PASSES, steps, watched_ops
from normfold.pipeline.runner import run_passes
from normfold.progress import Progress
from normfold.report import PassReport
from normfold.verify.report import VerifyReport
from normfold.verify.run import verify


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
    return rewrite_file(model_path, out, inplace, ("fold-bn",), {"direction": direction, "standalone": standalone},
                        progress=progress)


def fuse_file(model_path: Path, out: Path, *, inplace: bool, ops: tuple[str, ...], target: str,
              portable: bool = True, progress: Progress | None = None) -> RunSummary:
    """`normfold fuse` on files: fuse, embed function bodies, write atomically, summarise."""
    return rewrite_file(model_path, out, inplace, ("fuse",), {"ops": ops, "target": target}, portable=portable,
                        progress=progress)


def fold_wn_file(model_path: Path, out: Path, *, inplace: bool, portable: bool = True,
                 progress: Progress | None = None) -> RunSummary:
    """`normfold fold-wn` on files: weight-side folds, write atomically, summarise."""
    return rewrite_file(model_path, out, inplace, ("fold-wn",), portable=portable, progress=progress)


def recalibrate_file(model_path: Path, out: Path, *, inplace: bool, data, fold: bool,
                     progress: Progress | None = None) -> RunSummary:
    """`normfold recalibrate` on files: recalibrate, optionally fold, write atomically, summarise."""
    names = ("recalibrate", "fold-bn") if fold else ("recalibrate",)
    return rewrite_file(model_path, out, inplace, names, {"data": data, "progress": progress}, progress=progress)


def rewrite_file(model_path: Path, out: Path, inplace: bool, passes: tuple[str, ...], options: dict | None = None,
                 *, portable: bool = False, before_commit: Callable[[Path], bool] | None = None,
                 reference: Callable[[onnx.ModelProto], None] | None = None,
                 progress: Progress | None = None) -> RunSummary:
    """Load `model_path`, run the registered `passes` (with `options` where a pass
    takes them) through the one runner, write `out`, summarise. Weights no pass
    changed are never copied in memory.

    portable: embed function bodies for the com.normfold ops used (`normfold.ops.portable`).
    reference: called with the model after recalibration (when `passes` starts with it).
    before_commit: called with the staged output; False refuses it (nothing written).
    progress: reports the long steps (loading, each pass, writing).
    """
    progress = progress or Progress()
    options = options or {}
    with progress.step(f"loading {model_path.name}"):
        loaded = load_model(model_path)
    model, reports = loaded.model, []
    if reference is not None and passes[:1] == ("recalibrate",):
        recalibrated = run_passes(model, steps(passes[:1], **options), progress=progress)
        model, reports, passes = recalibrated.model, recalibrated.reports, passes[1:]
        reference(model)
    run = run_passes(model, steps(passes, **options), portable=portable, detach=True, progress=progress)
    with progress.step(f"writing {out.name}"):
        written = save_model(
            run.model, out, source=loaded.path, protect=loaded.external_files, inplace=inplace,
            external_data=True if loaded.had_external_data else None, detached=run.detached,
            before_commit=before_commit,
        )
    summary = RunSummary(
        input=model_path, output=out,
        ops_before=count_ops(loaded.model.graph), ops_after=count_ops(run.model.graph),
        bytes_before=loaded.file_bytes, bytes_after=written, reports=reports + run.reports,
    )
    summary.watch(watched_ops(tuple(r.name for r in summary.reports if r.name in PASSES)))
    return summary


def optimize_file(model_path: Path, out: Path, *, inplace: bool, passes: tuple[str, ...], target: str = "auto",
                  portable: bool = True, calibration=None, verify_options: dict | None = None,
                  progress: Progress | None = None) -> RunSummary:
    """`normfold optimize` on files: every selected pass, then verification of the
    written bytes against the input model (or, after recalibration, against the
    recalibrated model); a model that fails verification is not written.

    verify_options: keyword arguments of `normfold.verify.run.verify` (inputs, shapes,
    seed, samples, atol, rtol); None skips verification.
    """
    progress = progress or Progress()
    reference: Path | onnx.ModelProto = model_path
    verification: VerifyReport | None = None

    def recalibrated(model: onnx.ModelProto) -> None:
        nonlocal reference
        reference = model

    def verified(staged: Path) -> bool:
        nonlocal verification
        verification = verify(staged, reference, progress=progress, **verify_options)
        verification.candidate = str(out)
        return verification.passed

    summary = rewrite_file(
        model_path, out, inplace, passes,
        {"data": calibration, "progress": progress, "ops": FUSE_FAMILIES, "target": target},
        portable=portable, reference=recalibrated,
        before_commit=verified if verify_options is not None else None, progress=progress,
    )
    summary.verification = verification
    return summary

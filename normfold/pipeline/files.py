"""File-level commands: load a model, run passes, check and write the result, summarise.

Every runner checks what it writes (`normfold.pipeline.deploy_check`): the
result must load, run and match the input model in the deployment
configurations; a rewrite that breaks this is rolled back and reported.
`check=None` skips the check.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path


from normfold.io.model_io import LoadedModel, check_output, load_model, save_model
from normfold.ir.convert import count_ops
from normfold.passes.registry import FUSE_FAMILIES, PASSES, steps, watched_ops
from normfold.pipeline.deploy_check import CheckOptions, DeployChecker, Exclusions, Rollback, write_checked
from normfold.pipeline.runner import run_passes
from normfold.pipeline.speed_check import SpeedCheck, check_speed
from normfold.progress import Progress
from normfold.report import PassReport
from normfold.verify.report import VerifyReport

DEFAULT_CHECK = CheckOptions()


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
    verification: VerifyReport | None = None  # the output check (None: skipped with --no-check)
    rollbacks: list[Rollback] = field(default_factory=list)
    speed: SpeedCheck | None = None  # the speed check (None: skipped with --no-measure)

    def watch(self, ops: tuple[str, ...]) -> None:
        """Show the counts of those of `ops` present before or after."""
        self.watched_ops = tuple(dict.fromkeys(op for op in ops if self.ops_before.get(op) or self.ops_after.get(op)))

    @property
    def written(self) -> bool:
        """Whether the output was written (a failed check refuses it)."""
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
            "checked": self.verification is not None,
            **({"verification": self.verification.to_dict()} if self.verification else {}),
            "rollbacks": [r.to_dict() for r in self.rollbacks],
            **({"speed": self.speed.to_dict()} if self.speed else {}),
        }


def fold_bn_file(model_path: Path, out: Path, *, inplace: bool, direction: str, standalone: str,
                 check: CheckOptions | None = DEFAULT_CHECK, progress: Progress | None = None) -> RunSummary:
    """`normfold fold-bn` on files: fold, check, write atomically, summarise."""
    return rewrite_file(model_path, out, inplace, ("fold-bn",), {"direction": direction, "standalone": standalone},
                        check=check, progress=progress)


def fold_affine_file(model_path: Path, out: Path, *, inplace: bool, direction: str,
                     check: CheckOptions | None = DEFAULT_CHECK, progress: Progress | None = None) -> RunSummary:
    """`normfold fold-affine` on files: fold affine chains, check, write atomically, summarise."""
    return rewrite_file(model_path, out, inplace, ("fold-affine",), {"direction": direction}, check=check,
                        progress=progress)


def fuse_file(model_path: Path, out: Path, *, inplace: bool, ops: tuple[str, ...], target: str,
              portable: bool = True, check: CheckOptions | None = DEFAULT_CHECK,
              progress: Progress | None = None) -> RunSummary:
    """`normfold fuse` on files: fuse, embed function bodies, check, write atomically, summarise."""
    return rewrite_file(model_path, out, inplace, ("fuse",), {"ops": ops, "target": target}, portable=portable,
                        check=check, progress=progress)


def fold_wn_file(model_path: Path, out: Path, *, inplace: bool, portable: bool = True,
                 check: CheckOptions | None = DEFAULT_CHECK, progress: Progress | None = None) -> RunSummary:
    """`normfold fold-wn` on files: weight-side folds, check, write atomically, summarise."""
    return rewrite_file(model_path, out, inplace, ("fold-wn",), portable=portable, check=check, progress=progress)


def recalibrate_file(model_path: Path, out: Path, *, inplace: bool, data, fold: bool,
                     check: CheckOptions | None = DEFAULT_CHECK, progress: Progress | None = None) -> RunSummary:
    """`normfold recalibrate` on files: recalibrate, optionally fold, check against
    the recalibrated model, write atomically, summarise."""
    names = ("recalibrate", "fold-bn") if fold else ("recalibrate",)
    return rewrite_file(model_path, out, inplace, names, {"data": data, "progress": progress}, check=check,
                        progress=progress)


def rewrite_file(model_path: Path, out: Path, inplace: bool, passes: tuple[str, ...], options: dict | None = None,
                 *, portable: bool = False, check: CheckOptions | None = DEFAULT_CHECK,
                 loaded: LoadedModel | None = None, progress: Progress | None = None) -> RunSummary:
    """Load `model_path`, run the registered `passes` (with `options` where a pass
    takes them) through the one runner, check the result and write `out`,
    summarise. Weights no pass changed are never copied in memory.

    portable: embed function bodies for the com.normfold ops used (`normfold.ops.portable`).
    check: what the output check runs (`CheckOptions`); None skips it. The
    reference is the input model, or after recalibration (when `passes` starts
    with it) the recalibrated model. A result that fails is not written.
    loaded: `model_path` as already loaded by the caller (else it is loaded here).
    progress: reports the long steps (loading, each pass, checking, writing).
    """
    progress = progress or Progress()
    options = options or {}
    if loaded is None:
        with progress.step(f"loading {model_path.name}"):
            loaded = load_model(model_path)
    model, reports, reference = loaded.model, [], model_path
    if passes[:1] == ("recalibrate",):
        recalibrated = run_passes(model, steps(passes[:1], **options), progress=progress)
        model, reports, passes, reference = recalibrated.model, recalibrated.reports, passes[1:], recalibrated.model
    checker = DeployChecker(reference, check, progress) if check is not None else None

    def attempt(exclude: Exclusions, commit: bool):
        run = run_passes(model, steps(passes, exclude=exclude, **options), portable=portable, detach=True,
                         progress=progress)
        verification = None
        if checker is not None:
            try:
                check_output(run.model)
            except RuntimeError as exc:  # the onnx checker refuses it: a rewrite to roll back
                return run, 0, checker.refused(str(exc))

        def checked(staged: Path) -> bool:
            nonlocal verification
            verification = checker.check(staged)
            verification.candidate = str(out)
            return verification.passed and commit

        with progress.step(f"writing {out.name}"):
            written = save_model(
                run.model, out, source=loaded.path, protect=loaded.external_files, inplace=inplace,
                external_data=True if loaded.had_external_data else None, detached=run.detached,
                check=checker is None, before_commit=checked if checker else None,
            )
        return run, written, verification

    if checker is None:
        run, written, _ = attempt({}, True)
        verification, rollbacks = None, []
    else:
        result = write_checked(attempt, progress)
        run, written, verification, rollbacks = result.run, result.written, result.verification, result.rollbacks
    summary = RunSummary(
        input=model_path, output=out,
        ops_before=count_ops(loaded.model.graph), ops_after=count_ops(run.model.graph),
        bytes_before=loaded.file_bytes, bytes_after=written, reports=reports + run.reports,
        verification=verification, rollbacks=rollbacks,
    )
    summary.watch(watched_ops(tuple(r.name for r in summary.reports if r.name in PASSES)))
    return summary


def optimize_file(model_path: Path, out: Path, *, inplace: bool, passes: tuple[str, ...], target: str = "auto",
                  portable: bool = True, calibration=None, check: CheckOptions | None = DEFAULT_CHECK,
                  measure: dict | None = None, progress: Progress | None = None) -> RunSummary:
    """`normfold optimize` on files: every selected pass, then the output check
    against the input model (or, after recalibration, against the recalibrated
    model); a model that fails it even after rollbacks is not written.

    check: inputs, shapes, seed, samples, tolerances and configurations of the
    check (`CheckOptions`); None skips it.
    measure: keyword arguments of `normfold.pipeline.speed_check.check_speed` (inputs,
    shapes, seed, provider, threads, budget_s): the fused kinds that make the model
    slower are not fused; None skips the speed check.
    """
    speed, loaded = None, None
    if measure is not None:
        loaded = load_model(model_path)  # read once: timed here, then rewritten
        speed = check_speed(loaded.model, passes, target=target, portable=portable, progress=progress, **measure)
    summary = rewrite_file(
        model_path, out, inplace, passes,
        {"data": calibration, "progress": progress, "ops": speed.kept if speed else FUSE_FAMILIES, "target": target},
        portable=portable, check=check, loaded=loaded, progress=progress,
    )
    summary.speed = speed
    return summary

"""No invalid output, ever: every model a command writes is first run in
onnxruntime in the deployment configurations (normfold's library registered
and not, ORT_DISABLE_ALL and ORT_ENABLE_ALL) on generated inputs and compared
with the input model; a rewrite that breaks this is rolled back.

Rollback: the changes the passes reported are keyed by (pass, node). When the
result fails, the passes are re-run with sets of those nodes excluded (every
registered pass takes `exclude`), bisecting down to the changes whose exclusion
makes the result pass; every other change is kept. Each rolled-back change is
reported with the failure it caused (the onnxruntime error or the mismatch).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import onnx

from normfold.errors import NormfoldError
from normfold.io.inputs import default_dynamic_sizes, input_specs, parse_named_shapes, resolve_inputs
from normfold.io.model_io import model_and_name
from normfold.passes.registry import PASSES
from normfold.pipeline.runner import Run
from normfold.progress import Progress
from normfold.runtime.session import CONFIGURATIONS, Configuration
from normfold.verify.configurations import FAIL, NOT_APPLICABLE, ConfigurationResult, compare_runs, run_configurations
from normfold.verify.references import load_reference
from normfold.verify.report import VerifyReport

Key = tuple[str, str]  # (pass name, node name) of one reported change
ROLLBACK_ROUNDS = 3
Exclusions = dict[str, frozenset[str]]  # pass name -> the nodes it must leave alone


@dataclass(frozen=True)
class CheckOptions:
    """What the check runs: configurations, inputs (as for `verify`), tolerances.
    Dynamic input sizes not given in `shapes` are 1."""

    configurations: tuple[Configuration, ...] = tuple(CONFIGURATIONS.values())
    inputs: object = None
    shapes: tuple[str, ...] | dict = ()
    seed: int = 0
    samples: int = 1
    atol: float | None = None
    rtol: float | None = None


@dataclass
class Rollback:
    """A change undone because the result failed the check with it."""

    pass_name: str
    node: str
    op: str
    into: str
    reason: str  # one line: the configuration and the onnxruntime error or mismatch

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return asdict(self)


class DeployChecker:
    """Runs the reference (the input model, or the recalibrated one) once on
    generated inputs; `check(candidate)` then runs a candidate file in every
    configuration and compares it with those outputs."""

    def __init__(self, reference: Path | onnx.ModelProto, options: CheckOptions, progress: Progress | None = None):
        self.options, self.progress = options, progress or Progress()
        self._input_failures: dict[str, str] | None = None
        with self.progress.step("running the input model on generated inputs"):
            model, self.reference_name = model_and_name(reference, weights=False)
            specs = input_specs(model)
            shapes = options.shapes
            if options.inputs is None:
                given = parse_named_shapes(list(shapes), [s.name for s in specs]) if not isinstance(shapes, dict) \
                    else dict(shapes)
                shapes = {**default_dynamic_sizes(specs), **given}
            self.feeds, self.source = resolve_inputs(options.inputs, specs, shapes or None, options.seed,
                                                     options.samples)
            ref, self.reference = _reference_session(reference)
            ref.bind(specs)
            try:
                self.reference_runs = [ref.run(feeds) for feeds in self.feeds]
            except NormfoldError as exc:
                raise NormfoldError(f"{exc}; the output check runs the input model on {self.source}: give "
                                    "--shape NAME=SHAPE for its dynamic sizes, or --no-check to skip it") from exc
            self.reference_names = ref.output_names

    def check(self, candidate: Path) -> VerifyReport:
        """Run `candidate` in every configuration and compare it with the reference."""
        model, name = model_and_name(candidate, weights=False)
        runs = run_configurations(str(candidate), model, self.feeds, self.options.configurations,
                                  what=f"the output {name}", progress=self.progress)
        outputs, matched_by = compare_runs(runs, self.reference_runs, self.reference_names,
                                           atol=self.options.atol, rtol=self.options.rtol)
        for result in runs.results:
            if result.status == FAIL and result.name in self.input_failures():
                result.status = NOT_APPLICABLE
                result.detail = f"the input model fails here too: {self.input_failures()[result.name]}"
        report = VerifyReport(candidate=name, reference=self.reference_name, reference_kind="onnx", provider="cpu",
                              inputs=self.source, samples=len(self.feeds), matched_by=matched_by, outputs=outputs,
                              configurations=runs.results)
        if not runs.runs and not report.failed_configurations():  # every configuration n/a
            report.configurations[0].status = FAIL
            report.configurations[0].detail = "no configuration can run the output here"
        return report

    def input_failures(self) -> dict[str, str]:
        """The configurations where the input model itself fails (to load, run or
        match its own reference run), with why; run once, when a check first fails."""
        if self._input_failures is None:
            model = model_and_name(self.reference, weights=False)[0]
            runs = run_configurations(self.reference, model, self.feeds, self.options.configurations,
                                      what="the input model", progress=self.progress)
            compare_runs(runs, self.reference_runs, self.reference_names, atol=self.options.atol,
                         rtol=self.options.rtol)
            self._input_failures = {r.name: r.detail for r in runs.results if r.status == FAIL}
        return self._input_failures

    def refused(self, reason: str) -> VerifyReport:
        """A failed check of a result refused before it ran (e.g. by the onnx checker)."""
        return VerifyReport(candidate="", reference=self.reference_name, reference_kind="onnx", provider="cpu",
                            inputs=self.source, samples=len(self.feeds), matched_by="name",
                            configurations=[ConfigurationResult(c.name, c.describe(), FAIL, " ".join(reason.split())[:300])
                                            for c in self.options.configurations])


def _reference_session(reference: Path | onnx.ModelProto):
    """The reference run from its file, and what onnxruntime read it from (a path
    or, when it cannot read the file, e.g. a shape tensor stored as external
    data, the model loaded into memory)."""
    try:
        return load_reference(reference), reference if isinstance(reference, onnx.ModelProto) else str(reference)
    except NormfoldError:
        if isinstance(reference, onnx.ModelProto):
            raise
        model = model_and_name(reference)[0]
        return load_reference(model), model


# (exclusions, commit) -> the passes' run, bytes written (0 unless committed and passed), the check
Attempt = Callable[[Exclusions, bool], tuple[Run, int, VerifyReport]]


@dataclass
class CheckedWrite:
    """The run that was written (or refused), its check and the changes rolled back."""

    run: Run
    written: int
    verification: VerifyReport
    rollbacks: list[Rollback]


def write_checked(attempt: Attempt, progress: Progress | None = None) -> CheckedWrite:
    """Write through `attempt`; when the result fails its check, find the changes
    that break it (bisecting over the reported changes), write the result without
    them and report each. Excluding a change can let a pass make another one (a
    later anchor of the same subgraph), so this repeats up to ROLLBACK_ROUNDS
    times. If it fails even with every change rolled back, nothing is written
    and the failing check is returned."""
    progress = progress or Progress()
    run, written, report = attempt({}, True)
    tried: dict[frozenset[Key], VerifyReport] = {frozenset(): report}
    excluded: frozenset[Key] = frozenset()
    rollbacks: list[Rollback] = []
    for _ in range(ROLLBACK_ROUNDS):
        if report.passed:
            return CheckedWrite(run, written, report, rollbacks)
        changes = {(r.name, c.node): c for r in run.reports if _rollbackable(r.name) for c in r.changes}
        keys = [k for k in changes if k not in excluded]

        def trial(exclusion: frozenset[Key]) -> VerifyReport:
            if exclusion not in tried:
                with progress.step(f"checking with {len(exclusion)} changes rolled back"):
                    tried[exclusion] = attempt(_by_pass(exclusion), False)[2]
            return tried[exclusion]

        if not keys or not trial(excluded | frozenset(keys)).passed:
            break
        culprits = _culprits(keys, excluded, report, trial)
        excluded |= {k for k, _ in culprits}
        rollbacks += [Rollback(k[0], k[1], changes[k].op, changes[k].into, why) for k, why in culprits]
        run, written, report = attempt(_by_pass(excluded), True)
        tried[excluded] = report
    return CheckedWrite(run, written if report.passed else 0, report, rollbacks)


def _culprits(group: list[Key], excluded: frozenset[Key], failing: VerifyReport,
              trial: Callable[[frozenset[Key]], VerifyReport]) -> list[tuple[Key, str]]:
    """Changes of `group` whose exclusion (with `excluded`) makes the check pass,
    with the reason each failed. Known: excluded + group passes, `excluded` alone
    fails (as `failing`)."""
    if len(group) == 1:
        return [(group[0], _reason(failing))]
    half = len(group) // 2
    first, second = group[:half], group[half:]
    without_first = trial(excluded | set(first))
    if without_first.passed:
        return _culprits(first, excluded, failing, trial)
    without_second = trial(excluded | set(second))
    if without_second.passed:
        return _culprits(second, excluded, failing, trial)
    found = _culprits(first, excluded | set(second), without_second, trial)
    excluded = excluded | {k for k, _ in found}
    rest = trial(excluded)
    return found if rest.passed else found + _culprits(second, excluded, rest, trial)


def _reason(report: VerifyReport) -> str:
    """The first failing configuration of `report`, in one line."""
    failed = report.failed_configurations()
    return failed[0].line() if failed else report.verdict()


def _rollbackable(pass_name: str) -> bool:
    return pass_name in PASSES and "exclude" in PASSES[pass_name].options


def _by_pass(keys: frozenset[Key]) -> Exclusions:
    exclusions: dict[str, set[str]] = {}
    for pass_name, node in keys:
        exclusions.setdefault(pass_name, set()).add(node)
    return {name: frozenset(nodes) for name, nodes in exclusions.items()}

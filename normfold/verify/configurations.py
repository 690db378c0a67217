"""A candidate run in each deployment configuration (library registered or not,
ORT_DISABLE_ALL or ORT_ENABLE_ALL) and compared with reference outputs.

A configuration is "n/a" when it cannot apply, as a fact and not a failure:
the library is not built here, or the model uses com.normfold ops that carry
no function body (it needs the library). It fails when onnxruntime cannot
load or run the model in it, or when an output differs from the reference.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from normfold.errors import NormfoldError, ProviderUnavailable
from normfold.io.inputs import Feeds
from normfold.ir.convert import all_graphs
from normfold.ops.portable import needs_library_for
from normfold.ops.table import DOMAIN
from normfold.progress import Progress
from normfold.runtime.session import Configuration, library_available, make_session, run_session
from normfold.verify.compare import OutputComparison, compare_arrays, match_outputs

PASS, FAIL, NOT_APPLICABLE = "pass", "fail", "n/a"


@dataclass
class ConfigurationResult:
    """How the candidate fared in one configuration; `detail` is one line (the
    onnxruntime error, the outputs that differ, or why it does not apply)."""

    name: str
    description: str
    status: str = PASS
    detail: str = ""
    ran: bool = False  # onnxruntime loaded and ran the model (its outputs were compared)

    def line(self) -> str:
        """E.g. `lib-all (library, ORT_ENABLE_ALL): fail: onnxruntime cannot load the model: ...`."""
        return f"{self.name} ({self.description}): {self.status}" + (f": {self.detail}" if self.detail else "")

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return asdict(self)


@dataclass
class CandidateRuns:
    """The candidate's outputs per configuration that ran (name -> one list of
    arrays per sample), and a result for every configuration asked for."""

    output_names: list[str] = field(default_factory=list)
    runs: dict[str, list[list[np.ndarray]]] = field(default_factory=dict)
    results: list[ConfigurationResult] = field(default_factory=list)

    def first_failure(self) -> str | None:
        """The first failing configuration's line, or None."""
        return next((r.line() for r in self.results if r.status == FAIL), None)


def uses_custom_ops(model: onnx.ModelProto) -> bool:
    """Whether any node of `model` (subgraphs included) is a com.normfold op."""
    return any(n.domain == DOMAIN for g in all_graphs(model.graph) for n in g.node)


def not_applicable(config: Configuration, model: onnx.ModelProto) -> str | None:
    """Why `config` cannot apply to `model` (a fact, not a failure), or None."""
    if config.library and not library_available():
        return "normfold's library is not built here (see `normfold doctor`)"
    if not config.library:
        needed = needs_library_for(model)
        if needed:
            return (f"needs normfold's library: {', '.join(needed)} carr{'ies' if len(needed) == 1 else 'y'} "
                    "no function body (written with --no-portable)")
    return None


def run_configurations(source: onnx.ModelProto | str, model: onnx.ModelProto, feeds_list: list[Feeds],
                       configurations: tuple[Configuration, ...], *, provider: str = "cpu", what: str = "model",
                       progress: Progress | None = None) -> CandidateRuns:
    """Run `source` (a ModelProto or a path; `model` is its structure) on every
    sample in each configuration. Load and run failures are recorded, not raised.
    A model without com.normfold ops runs alike with and without the library, so
    it runs once per optimization level (the other configuration says so)."""
    progress = progress or Progress()
    runs = CandidateRuns()
    custom = uses_custom_ops(model)
    by_level: dict[bool, ConfigurationResult] = {}  # first configuration run per optimization level
    for config in configurations:
        result = ConfigurationResult(config.name, config.describe())
        runs.results.append(result)
        why_not = not_applicable(config, model)
        if why_not:
            result.status, result.detail = NOT_APPLICABLE, why_not
            continue
        same = None if custom else by_level.get(config.optimize)
        if same is not None:
            result.status, result.ran = same.status, same.ran
            result.detail = same.detail or f"as {same.name}: no com.normfold ops, the library changes nothing"
            if same.name in runs.runs:
                runs.runs[config.name] = runs.runs[same.name]
            continue
        by_level[config.optimize] = result
        try:
            session = make_session(source, provider=provider, optimize=config.optimize, library=config.library)
            runs.output_names = [o.name for o in session.get_outputs()]
            runs.runs[config.name] = [run_session(session, feeds, what=what) for feeds in
                                      progress.each(feeds_list, f"running {what} ({config.name})",
                                                    total=len(feeds_list))]
            result.ran = True
        except ProviderUnavailable:
            raise  # the machine, not the candidate: no configuration can run here
        except NormfoldError as exc:
            result.status, result.detail = FAIL, str(exc)
        session = None
    return runs


def compare_runs(runs: CandidateRuns, reference_runs: list[list[np.ndarray]], reference_names: list[str] | None,
                 *, atol: float | None = None, rtol: float | None = None
                 ) -> tuple[list[OutputComparison], str]:
    """Compare each configuration's outputs with `reference_runs` (one list of
    arrays per sample) and set its pass/fail. Returns the comparisons of the
    first configuration that ran (over all samples) and how outputs were matched."""
    ref_names = (reference_names or [f"output {i}" for i in range(len(reference_runs[0]))]) if reference_runs else []
    pairs, matched_by = match_outputs(runs.output_names, ref_names) if runs.runs else ([], "name")
    shown: list[OutputComparison] | None = None
    for result in runs.results:
        if result.name not in runs.runs:
            continue
        comparisons: list[OutputComparison] | None = None
        for cand_values, ref_values in zip(runs.runs[result.name], reference_runs):
            cand_by_name = dict(zip(runs.output_names, cand_values))
            ref_by_name = dict(zip(ref_names, ref_values))
            comparisons = [
                compare_arrays(cand_by_name[c], ref_by_name[r], name=c, reference_name=r, atol=atol, rtol=rtol,
                               into=comparisons[i] if comparisons else None)
                for i, (c, r) in enumerate(pairs)
            ]
        failed = [o for o in comparisons or [] if not o.passed]
        if failed:
            result.status = FAIL
            result.detail = "; ".join(f"output {o.name}: {o.why()}, max abs {o.max_abs:.2e}" for o in failed)
        if shown is None:
            shown = comparisons
    return shown or [], matched_by

"""The one pass runner: every way of running passes (the Python API, `optimize`,
each command) goes through `run_passes`, so they report alike."""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx

from normfold.io.model_io import DetachedTensor
from normfold.ir.convert import export_detached, export_model, import_graph
from normfold.ops.portable import embedded
from normfold.passes.registry import GraphPass
from normfold.progress import Progress
from normfold.report import PassReport


@dataclass
class Run:
    """What `run_passes` made: the model, one report per pass (then `portable`'s,
    when function bodies were embedded or refused), and the large weights left
    out of `model` when it was run with `detach=True` (see `save_model`)."""

    model: onnx.ModelProto
    reports: list[PassReport]
    detached: dict[str, DetachedTensor] = field(default_factory=dict)


def run_passes(model: onnx.ModelProto, steps: list[tuple[GraphPass, dict]], *, portable: bool = False,
               detach: bool = False, progress: Progress | None = None) -> Run:
    """Apply each `(graph_pass, options)` of `steps` in order to `model` (not modified).

    portable: embed a standard-ONNX function body for each com.normfold op used.
    detach: leave large unchanged weights out of the result (for `save_model`).
    progress: reports each step.
    """
    progress = progress or Progress()
    with progress.step("reading the graph"):
        graph = import_graph(model)
    reports = []
    for graph_pass, options in steps:
        with progress.step(graph_pass.__name__.replace("_", "-")):
            reports.append(graph_pass(graph, **options))
    with progress.step("building the output model"):
        result, detached = export_detached(graph, like=model) if detach else (export_model(graph, like=model), {})
        if portable:
            reports += embedded(result)
    return Run(result, reports, detached)


def combined(reports: list[PassReport]) -> PassReport:
    """One report for a single-pass run: the pass's, with the nodes no function
    body can serve (the `portable` report's skips) added to its skips."""
    first, *rest = reports
    return PassReport(first.name, list(first.changes), first.skipped + [s for r in rest for s in r.skipped])

"""Run one zoo case end to end and check what a user would check.

    result = run_case(ARCHITECTURES["bert"], CONFIGS["ts13"])
    result.green, result.problems        # True / [] when every check holds

A case is exported (cached, see `tests.helpers.norm_models.export`), optimized with
`normfold.optimize`, and then:
  foldable   no BatchNormalization left that `normfold.fold_bn` could fold, and none
             over a constant (weight standardisation computed at run time)
  decomposed no normalization left decomposed: a ReduceMean of a square or one that is
             subtracted from its own input, and no GroupNorm's Reshape→InstanceNormalization
  error      max |optimized - PyTorch| / max |PyTorch| <= 1e-5 (fp16: at most twice the
             export's own error against the float32 PyTorch model, plus 1e-3 of slack
             for the rounding of the fp16 output itself)
  runs       loads and runs in onnxruntime at ORT_ENABLE_ALL with normfold's library
             registered and without it, and agrees with itself across the two
"""

from __future__ import annotations

import copy
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
import torch

import normfold
from tests.helpers.norm_models import ExportError, export

from .registry import Architecture, ExportConfig

TOLERANCE = 1e-5
FP16_FACTOR = 2.0
FP16_SLACK = 1e-3
STANDARD_NORMS = ("LayerNormalization", "GroupNormalization", "RMSNormalization")
ONNXRUNTIME_OWN = "onnxruntime's graph optimizations"  # starts the problem that is not normfold's


@dataclass
class CaseResult:
    """What one case did. `stage` is where it stopped: "export" (the exporter failed;
    not normfold's), "optimize" (normfold raised), "run" (an onnxruntime session
    failed) or "checked"."""

    arch: str
    config: str
    stage: str = "export"
    problems: list[str] = field(default_factory=list)
    error: float | None = None  # fused: the com.normfold and standard norm ops of the result, by type
    export_error: float | None = None
    fused: dict[str, int] = field(default_factory=dict)
    skip_reasons: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def green(self) -> bool:
        """Whether the case was checked and every check held."""
        return self.stage == "checked" and not self.problems

    @property
    def normfolds_problems(self) -> list[str]:
        """The problems but the documented one of onnxruntime's own optimizer (the
        optimized model is then exact at ORT_DISABLE_ALL)."""
        return [p for p in self.problems if not p.startswith(ONNXRUNTIME_OWN)]


def run_case(arch: Architecture, config: ExportConfig) -> CaseResult:
    """Export, optimize and check one case; never raises for a failing case."""
    result = CaseResult(arch.name, config.name)
    start = time.perf_counter()
    try:
        _run(arch, config, result)
    finally:
        result.seconds = time.perf_counter() - start
    return result


def _run(arch: Architecture, config: ExportConfig, result: CaseResult) -> None:
    module, args = arch.build()
    try:
        model = export(module, args, exporter=config.exporter, opset=config.opset,
                       constant_folding=config.constant_folding, name=f"zoo-{arch.name}")
    except ExportError as why:
        result.problems.append(f"export failed: {str(why).splitlines()[0][:300]}")
        return
    feeds = _feeds(model, args)
    try:
        run_onnx(model, feeds, library=False, optimize=False)
    except Exception as why:  # the exporter wrote a model onnxruntime cannot run
        result.problems.append(f"export failed: onnxruntime cannot run the export itself: {_first_line(why)}")
        return
    result.stage = "optimize"
    try:
        optimized, reports = normfold.optimize(model)
    except Exception as why:  # a crash is a finding
        result.problems.append(f"optimize raised {type(why).__name__}: {str(why).splitlines()[0][:300]}")
        return
    result.fused = dict(Counter(n.op_type for n in optimized.graph.node
                                if n.domain == "com.normfold" or n.op_type in STANDARD_NORMS))
    result.skip_reasons = dict(Counter(s.reason for r in reports for s in r.skipped))
    result.problems += foldable_left(optimized) + decomposed_left(optimized)
    result.stage = "run"
    reference = _reference(module, args, arch.fp16)
    outputs = {}
    for library in (True, False):
        try:
            outputs[library] = run_onnx(optimized, feeds, library)
        except Exception as why:
            result.problems.append(f"onnxruntime ORT_ENABLE_ALL {'with' if library else 'without'} the library: "
                                   f"{_first_line(why)}")
    if not outputs:
        return
    result.stage = "checked"
    result.error = max(relative_error(y, reference) for y in outputs.values())
    limit = TOLERANCE
    if arch.fp16:
        result.export_error = relative_error(run_onnx(model, feeds, library=False), reference)
        limit = FP16_FACTOR * result.export_error + FP16_SLACK
    if len(outputs) == 2 and not relative_error(outputs[False], outputs[True]) <= limit:
        result.problems.append("with and without the library the outputs differ")
    if not result.error <= limit:
        result.problems.append(_error_problem(model, optimized, feeds, reference, result.error, limit))


def _first_line(error: Exception) -> str:
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:300]}"


def _error_problem(model, optimized, feeds, reference, error: float, limit: float) -> str:
    """What is wrong when the optimized model is `error` off PyTorch at ORT_ENABLE_ALL, and
    whose doing it is: where onnxruntime's own graph optimizations already move the export
    itself as far, and the optimized model is exact with them off, it is onnxruntime's."""
    own = relative_error(run_onnx(model, feeds, library=False), reference)
    unoptimized = relative_error(run_onnx(optimized, feeds, library=True, optimize=False), reference)
    if own > limit and unoptimized <= limit and error <= 2 * own:
        return (f"{ONNXRUNTIME_OWN}: the export itself is {own:.1e} off PyTorch at ORT_ENABLE_ALL "
                f"(optimized: {error:.1e}; {unoptimized:.1e} at ORT_DISABLE_ALL)")
    return f"relative error {error:.2e} > {limit:.1e}"


def _reference(module, args, fp16: bool) -> list[np.ndarray]:
    """PyTorch's outputs; for an fp16 model those of its float32 copy."""
    if fp16:
        module = copy.deepcopy(module).float()
        args = tuple(a.float() if a.is_floating_point() else a for a in args)
    with torch.no_grad():
        out = module(*args)
    out = out if isinstance(out, (tuple, list)) else (out,)
    return [o.float().numpy() for o in out]


def _feeds(model: onnx.ModelProto, args) -> dict[str, np.ndarray]:
    """The example inputs by graph input name (exporters drop unused inputs, in order)."""
    names = [i.name for i in model.graph.input]
    arrays = [a.numpy() for a in args]
    if len(names) != len(arrays):
        raise ValueError(f"the export has inputs {names} for {len(arrays)} example inputs")
    return dict(zip(names, arrays))


def run_onnx(model: onnx.ModelProto, feeds, library: bool, optimize: bool = True) -> list[np.ndarray]:
    """`model`'s outputs from onnxruntime (CPU, ORT_ENABLE_ALL or, not `optimize`,
    ORT_DISABLE_ALL), with normfold's custom-op library registered or not."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else \
        ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    if library:
        options.register_custom_ops_library(normfold.ops_library_path())
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return [np.asarray(y, dtype=np.float32) for y in session.run(None, feeds)]


def relative_error(got: list[np.ndarray], want: list[np.ndarray]) -> float:
    """max over outputs of max |got - want| / max |want|."""
    if len(got) != len(want):
        return float("inf")
    worst = 0.0
    for g, w in zip(got, want):
        if g.shape != w.shape:
            return float("inf")
        scale = float(np.abs(w).max()) or 1.0
        worst = max(worst, float(np.abs(g.astype(np.float64) - w).max()) / scale)
    return worst


# ---------------------------------------------------------------------------- what is left

def foldable_left(model: onnx.ModelProto) -> list[str]:
    """Problems: BatchNormalization nodes fold-bn could still fold, or over constants."""
    problems = []
    _, report = normfold.fold_bn(model)
    if report.changes:
        problems.append(f"{len(report.changes)} BatchNormalization left that fold-bn folds")
    constant = _constant_tensors(model.graph)
    over_constants = sum(n.op_type == "BatchNormalization" and n.input[0] in constant for n in model.graph.node)
    if over_constants:
        problems.append(f"{over_constants} BatchNormalization over a constant (weight standardisation) left")
    return problems


def decomposed_left(model: onnx.ModelProto) -> list[str]:
    """Problems: normalizations left in decomposed form in the main graph."""
    graph = model.graph
    made_by = {out: n for n in graph.node for out in n.output}
    constant = _constant_tensors(graph)
    found = Counter()
    for node in graph.node:
        if node.op_type == "ReduceMean" and node.input[0] not in constant:
            source = _through_casts(made_by, node.input[0])
            if source is not None and _is_square(source, constant):
                found["ReduceMean of a square"] += 1
            elif any(n.op_type == "Sub" and n.input[1] == node.output[0] and
                     _through_casts(made_by, n.input[0]) is source for n in graph.node):
                found["mean subtracted from its input"] += 1
        if node.op_type == "InstanceNormalization" and made_by.get(node.input[0]) is not None and \
                made_by[node.input[0]].op_type == "Reshape":
            found["GroupNorm as Reshape→InstanceNormalization"] += 1
    return [f"{n} decomposed norm node(s) left: {what}" for what, n in found.items()]


def _through_casts(made_by, name):
    node = made_by.get(name)
    while node is not None and node.op_type in ("Cast", "Identity"):
        node = made_by.get(node.input[0])
    return node


def _is_square(node, constant) -> bool:
    if node.op_type == "Mul":
        return len(node.input) == 2 and node.input[0] == node.input[1]
    return node.op_type == "Pow" and node.input[1] in constant


def _constant_tensors(graph: onnx.GraphProto) -> set[str]:
    """Names of the main graph's tensors computable from initializers and Constant nodes
    alone (graph inputs and Shape of non-constants excluded)."""
    constant = {t.name for t in graph.initializer} - {i.name for i in graph.input}
    for node in graph.node:  # nodes are topologically sorted
        if node.op_type != "Shape" and all(not i or i in constant for i in node.input):
            constant.update(node.output)
    return constant


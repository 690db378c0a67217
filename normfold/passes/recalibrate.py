"""AdaBN: re-estimate the statistics of inference BatchNorm on target-domain data.

For every inference `BatchNormalization` (constant scale/B/mean/var) of the
main graph, the population mean and (biased) variance of its input over all
calibration samples and all non-channel positions replace its mean/var.
Statistics are accumulated per batch in float64 and combined across batches
with Chan's parallel formula, so one batch is in memory at a time and the
result does not depend on how the data is split into batches.

Order: recalibrating a BN changes what every later layer sees. Each BN is
measured on activations computed with every BN upstream of it already
recalibrated (the result of updating the layers one by one in forward order).
BNs are processed in topological waves: wave k holds the BNs whose upstream
BNs all lie in waves < k; one pass over the data measures a whole wave (its
BN inputs are exposed as extra outputs of the model, run in onnxruntime with
graph optimizations off), then the wave's statistics are written and the next
wave runs. The data is read once per wave, i.e. as many times as the deepest
chain of BNs is long.

BNs inside If/Loop/Scan bodies, in training mode, with non-constant
parameters or on a constant input are left as they are, with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from normfold.io.calibration_data import CalibrationData
from normfold.errors import NormfoldError
from normfold.ir.convert import export_model
from normfold.io.inputs import input_specs
from normfold.runtime.intermediates import IntermediateRunner, tensor_types
from normfold.ir.verbs import (
    NameScope,
    constant_value,
    consumers,
    float_attr,
    is_observable,
    walk_graphs,
)
from normfold.passes.batchnorm import BN, Skip, inference_bn
from normfold.progress import Progress
from normfold.report import Change, PassReport

MEAN, VAR = 3, 4  # input indices of BatchNormalization


class RunningMoments:
    """Per-channel count, mean and sum of squared deviations (M2) of tensors
    whose channel axis is 1, in float64, combined with Chan's parallel formula."""

    def __init__(self, channels: int):
        self.count = 0
        self.mean = np.zeros(channels)
        self.m2 = np.zeros(channels)

    def add(self, x: np.ndarray) -> None:
        """Fold in every element of `x` (shape N x C x ...)."""
        if x.ndim < 2 or x.shape[1] != self.mean.size:
            raise NormfoldError(f"a BatchNormalization input of shape {list(x.shape)} does not have "
                                f"{self.mean.size} channels on axis 1")
        values = np.moveaxis(x, 1, 0).reshape(self.mean.size, -1).astype(np.float64)
        n = values.shape[1]
        if n == 0:
            return
        mean = values.mean(axis=1)
        m2 = np.square(values - mean[:, None]).sum(axis=1)
        self.merge(n, mean, m2)

    def merge(self, n: int, mean: np.ndarray, m2: np.ndarray) -> None:
        """Combine with the moments (n, mean, M2) of another set of samples."""
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + np.square(delta) * (self.count * n / total)
        self.count = total

    @property
    def var(self) -> np.ndarray:
        """Population (biased) variance: M2 / count."""
        return self.m2 / self.count


@dataclass
class Recalibrated(Change):
    """A BN given new statistics, with the largest changes over its channels."""

    max_abs_delta_mean: float | None = None
    max_rel_delta_var: float | None = None  # |Δvar| / (|old var| + ε)


@dataclass
class RecalibrationReport(PassReport):
    """The recalibrate pass's report, plus how much data it saw."""

    batches: int = 0
    samples: int = 0
    waves: int = 0

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {**super().to_dict(), "batches": self.batches, "samples": self.samples, "waves": self.waves}

    def describe(self) -> str:
        """One line: data seen and the largest changes."""
        text = f"statistics from {self.samples} samples in {self.batches} batches, {self.waves} waves"
        for label, key in (("largest |Δmean|", "max_abs_delta_mean"), ("largest relative Δvar", "max_rel_delta_var")):
            values = [(getattr(c, key), c.node) for c in self.changes if getattr(c, key) is not None]
            if values:
                value, node = max(values)
                text += f"; {label} {value:.3g} ({node})"
        return text


@dataclass
class Layer:
    """A BN to recalibrate, with the values its statistics had."""

    node: gs.Node
    old_mean: np.ndarray
    old_var: np.ndarray
    moments: RunningMoments = field(init=False)

    def __post_init__(self):
        self.moments = RunningMoments(self.old_mean.size)

    @property
    def x(self) -> gs.Tensor:
        return self.node.inputs[0]


def recalibrate_graph(graph: gs.Graph, data, *, progress: Progress | None = None) -> RecalibrationReport:
    """Replace the mean/var of every inference BN of `graph` by the statistics of
    its input on `data` (AdaBN), in topological waves (see the module docstring).

    data: an `.npz` path, a folder of `.npz` files (one batch each), or a
    sequence of {input name: array} dicts. progress: where the bar over batches shows.
    """
    report = RecalibrationReport("recalibrate")
    layers = _layers(graph, report)
    names = NameScope(graph)
    for layer in layers:
        for index in (MEAN, VAR):
            _own(graph, layer.node, index, names)
    probe = _probe_model(graph)
    batches = CalibrationData(data, input_specs(probe))
    report.batches, report.samples = len(batches), batches.samples
    waves = _waves(graph, layers)
    report.waves = len(waves)
    initializers = {init.name: init for init in probe.graph.initializer}
    types = tensor_types(probe)
    with (progress or Progress()).bar(len(waves) * len(batches), "recalibrate", unit="batch") as bar:
        for number, wave in enumerate(waves, start=1):
            bar.set_postfix_str(f"wave {number}/{len(waves)}")
            _measure(probe, types, wave, batches, bar)
            for layer in wave:
                _update(layer, initializers, report, f"wave {number}")
    return report


# --- which BNs, and making their statistics their own -------------------------


def _layers(graph: gs.Graph, report: PassReport) -> list[Layer]:
    """The BNs of `graph` to recalibrate; the others are reported as skipped."""
    layers, found = [], 0
    for g, where in walk_graphs(graph):
        for node in [n for n in g.nodes if n.op == BN]:
            found += 1
            try:
                if g is not graph:
                    raise Skip("inside a subgraph (If/Loop/Scan body): its input is not a tensor of the main graph")
                layers.append(_layer(graph, node))
            except Skip as why:
                report.skip(node.name, BN, str(why), where)
    if not found:
        raise NormfoldError(
            "the model has no BatchNormalization node (was it already folded?); recalibration must run "
            "before folding: run normfold recalibrate on the unfolded model (add --fold to fold afterwards)")
    return layers


def _layer(graph: gs.Graph, node: gs.Node) -> Layer:
    bn = inference_bn(graph, node, graph.opset)
    if isinstance(node.inputs[0], gs.Constant):
        raise Skip("input is a constant")
    return Layer(node, bn.mean.astype(np.float64).reshape(-1), bn.var.astype(np.float64).reshape(-1))


def _own(graph: gs.Graph, node: gs.Node, index: int, names: NameScope) -> None:
    """Make input `index` of `node` a constant read by `node` alone, so writing
    it changes nothing else: a shared, computed or Constant-node tensor is
    replaced by a copy of its value (same dtype and shape)."""
    tensor = node.inputs[index]
    readers = consumers(tensor)
    # a tensor read twice by `node` (B is mean) is listed twice among its readers
    if isinstance(tensor, gs.Constant) and len(readers) == 1 and readers[0] is node \
            and not is_observable(graph, tensor):
        return
    value = constant_value(tensor, graph.opset)
    node.inputs[index] = gs.Constant(names.fresh(f"{tensor.name}_recalibrated"), np.array(value))


# --- waves ------------------------------------------------------------------


def _waves(graph: gs.Graph, layers: list[Layer]) -> list[list[Layer]]:
    """`layers` grouped so that every BN upstream of a layer is in an earlier group."""
    graph.toposort()
    by_node = {id(layer.node): layer for layer in layers}
    level: dict[str, int] = {}  # tensor -> latest wave of the BNs it depends on
    waves: list[list[Layer]] = []
    for node in graph.nodes:
        depth = max((level.get(name, 0) for name in _reads(node)), default=0)
        layer = by_node.get(id(node))
        if layer is not None:
            depth += 1
            if len(waves) < depth:
                waves.append([])
            waves[depth - 1].append(layer)
        for out in node.outputs:
            level[out.name] = depth
    return waves


def _reads(node: gs.Node) -> set[str]:
    """Names of the tensors `node` reads, inside its subgraphs too."""
    names = {t.name for t in node.inputs}
    for value in node.attrs.values():
        if isinstance(value, gs.Graph):
            for inner in value.nodes:
                names |= _reads(inner)
    return names


# --- measuring and writing ----------------------------------------------------


def _probe_model(graph: gs.Graph) -> onnx.ModelProto:
    """`graph` as a model onnxruntime can run (main-graph constants are initializers)."""
    like = onnx.ModelProto()
    like.opset_import.extend(graph.import_domains)
    like.ir_version = graph.ir_version or onnx.helper.find_min_ir_version_for(list(graph.import_domains), True)
    return export_model(graph, like)


def _measure(probe: onnx.ModelProto, types: dict[str, int], wave: list[Layer], batches: CalibrationData,
             bar) -> None:
    """One pass over `batches`: accumulate the moments of each layer's input."""
    inputs = {spec.name for spec in batches.specs}
    computed = list(dict.fromkeys(layer.x.name for layer in wave if layer.x.name not in inputs))
    runner = IntermediateRunner(probe, computed, types) if computed else None
    for source, feeds in batches:
        values = dict(feeds)
        if runner is not None:
            try:
                values.update(runner.run(feeds))
            except NormfoldError as exc:
                raise NormfoldError(f"{source}: {exc}") from exc
        for layer in wave:
            layer.moments.add(values[layer.x.name])
        bar.update()


def _update(layer: Layer, initializers: dict[str, onnx.TensorProto], report: RecalibrationReport,
            how: str) -> None:
    """Write the layer's measured statistics into its mean/var (graph and probe)."""
    node, moments = layer.node, layer.moments
    mean, var = moments.mean, moments.var
    if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(var))):
        report.skip(node.name, BN, "measured statistics are NaN or Inf (NaN/Inf in the calibration data or "
                                   "its activations); left as it was")
        return
    for index, values in ((MEAN, mean), (VAR, var)):
        constant = node.inputs[index]
        old = initializers[constant.name]
        new = values.astype(onnx.helper.tensor_dtype_to_np_dtype(old.data_type)).reshape(tuple(old.dims))
        constant.values = new
        old.CopyFrom(numpy_helper.from_array(new, constant.name))
    epsilon = float_attr(node, "epsilon", 1e-5)
    report.changes.append(Recalibrated(
        node.name, BN, "new mean/var", how,
        max_abs_delta_mean=_finite_max(np.abs(mean - layer.old_mean)),
        max_rel_delta_var=_finite_max(np.abs(var - layer.old_var) / (np.abs(layer.old_var) + epsilon)),
    ))


def _finite_max(values: np.ndarray) -> float | None:
    """The largest value, or None when it is NaN/Inf (old statistics held NaN/Inf)."""
    top = float(np.max(values)) if values.size else 0.0
    return top if np.isfinite(top) else None



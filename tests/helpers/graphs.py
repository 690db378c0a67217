"""Builders for small ONNX test graphs, and the independent reference used to
check folded models: onnxruntime on the *unmodified* model with every graph
optimization disabled (otherwise onnxruntime folds BatchNorm itself and hides
mistakes).

Nothing here imports normfold's implementation except `fold`, the one entry
point under test; sessions are built here, not with normfold.runtime.session, so a bug
there cannot hide a bug in the pass.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 10  # onnx 1.23 writes 14 by default; onnxruntime here accepts <= 13
ONNX_TYPE = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(np.float64): TensorProto.DOUBLE,
    np.dtype(np.int64): TensorProto.INT64,
    np.dtype(np.bool_): TensorProto.BOOL,
}


class G:
    """A tiny op builder over onnx.helper. Every method returns the name(s) of
    the tensor(s) it made, so graphs read like the formula they build."""

    _ids = itertools.count()

    def __init__(self, dtype=np.float32, opset: int = 17, name: str = "main", rng=None):
        self.dtype = np.dtype(dtype)
        self.opset = opset
        self.name = name
        self.rng = rng if rng is not None else np.random.default_rng(0)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.feeds: dict[str, np.ndarray] = {}  # a random value for every graph input

    # -- plumbing --------------------------------------------------------
    def fresh(self, prefix: str) -> str:
        return f"{self.name}_{prefix}_{next(self._ids)}"

    def input(self, shape, name: str | None = None, dtype=None, value=None) -> str:
        dtype = np.dtype(dtype or self.dtype)
        name = name or self.fresh("in")
        self.inputs.append(helper.make_tensor_value_info(name, ONNX_TYPE[dtype], list(shape)))
        if value is None:
            value = self.rng.standard_normal(shape).astype(dtype) if dtype.kind == "f" else np.zeros(shape, dtype)
        self.feeds[name] = np.asarray(value, dtype=dtype)
        return name

    def const(self, array, name: str | None = None, keep_dtype: bool = False) -> str:
        """An initializer; float arrays are cast to the graph dtype unless keep_dtype."""
        array = np.asarray(array)
        if array.dtype.kind == "f" and not keep_dtype:
            array = array.astype(self.dtype)
        name = name or self.fresh("c")
        self.inits.append(numpy_helper.from_array(array, name))
        return name

    def const_node(self, array, name: str | None = None) -> str:
        """A tensor produced by a Constant node instead of an initializer."""
        array = np.asarray(array)
        if array.dtype.kind == "f":
            array = array.astype(self.dtype)
        out = name or self.fresh("k")
        self.nodes.append(helper.make_node("Constant", [], [out], name=self.fresh("Constant"),
                                           value=numpy_helper.from_array(array, out + "_value")))
        return out

    def randn(self, shape, scale: float = 1.0) -> np.ndarray:
        return (self.rng.standard_normal(shape) * scale).astype(np.float64)

    def op(self, op_type: str, inputs, n_out: int = 1, name: str | None = None, outputs=None, **attrs):
        outputs = outputs or [self.fresh(op_type.lower()) for _ in range(n_out)]
        node = helper.make_node(op_type, list(inputs), list(outputs), name=name or self.fresh(op_type), **attrs)
        self.nodes.append(node)
        return outputs[0] if len(outputs) == 1 else outputs

    def output(self, name: str, dtype=None, shape=None) -> str:
        dtype = np.dtype(dtype or self.dtype)
        self.outputs.append(helper.make_tensor_value_info(name, ONNX_TYPE[dtype], shape))
        return name

    def graph(self) -> onnx.GraphProto:
        return helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.inits)

    def model(self, opset: int | None = None, ir_version: int = IR_VERSION) -> onnx.ModelProto:
        m = helper.make_model(self.graph(), opset_imports=[helper.make_opsetid("", opset or self.opset)],
                              ir_version=ir_version, producer_name="normfold-tests")
        fill_output_shapes(m)
        onnx.checker.check_model(m)
        return m

    # -- layers ----------------------------------------------------------
    def conv(self, x, cin: int, cout: int, kernel, *, group: int = 1, bias: bool = True,
             weight=None, b=None, name: str | None = None, **attrs) -> str:
        kernel = list(kernel)
        w = weight if weight is not None else self.const(self.randn([cout, cin // group, *kernel], 0.5))
        ins = [x, w]
        if bias:
            ins.append(b if b is not None else self.const(self.randn([cout])))
        return self.op("Conv", ins, name=name, group=group, kernel_shape=kernel, **attrs)

    def conv_transpose(self, x, cin: int, cout: int, kernel, *, group: int = 1, bias: bool = True,
                       name: str | None = None, **attrs) -> str:
        kernel = list(kernel)
        w = self.const(self.randn([cin, cout // group, *kernel], 0.5))
        ins = [x, w]
        if bias:
            ins.append(self.const(self.randn([cout])))
        return self.op("ConvTranspose", ins, name=name, group=group, kernel_shape=kernel, **attrs)

    def bn(self, x, c: int, *, eps: float = 1e-5, params=None, name: str | None = None,
           param_names=None, **attrs) -> tuple[str, str]:
        """BatchNormalization with random running statistics; returns (output, node name).
        `params` overrides the generated (scale, bias, mean, var) arrays;
        `param_names` passes existing tensors instead of new initializers."""
        name = name or self.fresh("BN")
        if param_names is None:
            p = params if params is not None else bn_params(self.rng, c)
            param_names = [self.const(a, name=f"{name}_{k}") for k, a in zip(("scale", "bias", "mean", "var"), p)]
        y = self.op("BatchNormalization", [x, *param_names], name=name, epsilon=eps, **attrs)
        return y, name


def bn_params(rng, c: int, k: float = 1.0, zero_shift: bool = False):
    """Random inference statistics (never the identity init, which hides mistakes):
    gamma random with random sign, beta ~ N(0,1), mean ~ N(0,1)*k, var ~ U(0.1, 4).
    zero_shift: beta = mean = 0, so t = beta - s*mean is exactly 0."""
    gamma = rng.uniform(0.5, 1.5, c) * rng.choice([-1.0, 1.0], c)
    beta = rng.standard_normal(c)
    mean = rng.standard_normal(c) * k
    var = rng.uniform(0.1, 4.0, c)
    if zero_shift:
        beta = np.zeros(c)
        mean = np.zeros(c)
    return gamma, beta, mean, var


def fill_output_shapes(model: onnx.ModelProto) -> None:
    """Give graph outputs declared without a shape the shape onnx infers (the
    checker requires one)."""
    missing = [o for o in model.graph.output if not o.type.tensor_type.HasField("shape")]
    if not missing:
        return
    inferred = {o.name: o for o in onnx.shape_inference.infer_shapes(model).graph.output}
    for out in missing:
        if out.name in inferred and inferred[out.name].type.tensor_type.HasField("shape"):
            out.type.CopyFrom(inferred[out.name].type)


# -- reference and inspection ---------------------------------------------
def ort_session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def ort_run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    """All graph outputs of `model`, in graph-output order."""
    session = ort_session(model)
    names = [o.name for o in model.graph.output]
    return session.run(names, feeds)


def all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in list(attr.graphs) + ([attr.g] if attr.HasField("g") else []):
                yield from all_nodes(sub)


def count_op(model: onnx.ModelProto, op_type: str) -> int:
    return sum(1 for n in all_nodes(model.graph) if n.op_type == op_type)


def node_names(model: onnx.ModelProto, op_type: str) -> list[str]:
    return [n.name for n in all_nodes(model.graph) if n.op_type == op_type]


def fold(model: onnx.ModelProto, check_input: bool = True, api: str = "fold_bn", **options):
    """normfold.fold_bn (or the API function `api`, e.g. "fold_affine") with the
    invariants every call must keep: the input model is not modified (unless
    check_input=False: the caller checks it later), and the result is a valid model."""
    import normfold

    before = model.SerializeToString()
    folded, report = getattr(normfold, api)(model, **options)
    if check_input:
        assert model.SerializeToString() == before, f"{api} modified its input ModelProto"
    assert isinstance(folded, onnx.ModelProto)
    onnx.checker.check_model(folded)
    assert folded.ir_version <= 13, f"folded model has IR version {folded.ir_version}; onnxruntime accepts <= 13"
    return folded, report


def max_err(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(got.astype(np.float64) - ref.astype(np.float64)))) if ref.size else 0.0


def tolerance(ref: np.ndarray, dtype) -> float:
    """Allowed max abs error relative to the output's scale.
    fp32: 1e-5 * max(1, max|ref|). fp16: 16 units of fp16 rounding (2**-11) of
    that scale, since folded weights and the reference's intermediate results are
    each rounded to fp16. fp64: 1e-12."""
    scale = max(1.0, float(np.max(np.abs(ref.astype(np.float64)))) if ref.size else 1.0)
    dtype = np.dtype(dtype)
    if dtype == np.float16:
        return 16 * 2.0**-11 * scale
    if dtype == np.float64:
        return 1e-12 * scale
    return 1e-5 * scale


def assert_same_outputs(original: onnx.ModelProto, folded: onnx.ModelProto, feeds: dict, dtype=None):
    """Every output of `folded` matches ORT on `original` (optimizations off)."""
    refs = ort_run(original, feeds)
    gots = ort_run(folded, feeds)
    assert len(refs) == len(gots)
    for i, (ref, got) in enumerate(zip(refs, gots)):
        assert got.shape == ref.shape, f"output {i}: shape {got.shape} != reference {ref.shape}"
        assert got.dtype == ref.dtype, f"output {i}: dtype {got.dtype} != reference {ref.dtype}"
        assert np.all(np.isfinite(got)), f"output {i}: non-finite values in folded output"
        err, tol = max_err(got, ref), tolerance(ref, dtype or ref.dtype)
        assert err <= tol, f"output {i}: max abs error {err:.3g} > {tol:.3g}"
    return refs


def initializer_names(model: onnx.ModelProto) -> set[str]:
    names = set()

    def walk(graph):
        names.update(i.name for i in graph.initializer)
        for node in graph.node:
            for attr in node.attribute:
                for sub in list(attr.graphs) + ([attr.g] if attr.HasField("g") else []):
                    walk(sub)

    walk(model.graph)
    return names


def used_names(model: onnx.ModelProto) -> set[str]:
    used = {o.name for o in model.graph.output}
    for node in all_nodes(model.graph):
        used.update(node.input)
        for attr in node.attribute:  # subgraph outputs are consumed by their parent node
            for sub in list(attr.graphs) + ([attr.g] if attr.HasField("g") else []):
                used.update(o.name for o in sub.output)
    return used


def skips_for(report, node: str):
    return [s for s in report.skipped if s.node == node]


def changes_for(report, node: str):
    return [c for c in report.changes if c.node == node]


# -- model files on disk ----------------------------------------------------
def conv_bn_model(seed: int = 0, c_in: int = 8, c_out: int = 16) -> tuple[onnx.ModelProto, dict]:
    """Conv(3x3, weight big enough for external data and for normfold's
    'large tensor' path) -> BN -> Relu, and an input feed."""
    g = G(rng=np.random.default_rng(seed))
    x = g.input([1, c_in, 6, 6], name="x")
    y = g.conv(x, c_in, c_out, [3, 3], pads=[1, 1, 1, 1], name="conv")
    out, _ = g.bn(y, c_out, name="bn")
    g.output(g.op("Relu", [out], outputs=["y"]))
    return g.model(), g.feeds


def save_with_external_data(model: onnx.ModelProto, path, location: str, threshold: int = 1024) -> None:
    """Save `model` at `path` with tensors >= threshold bytes in `location`
    (relative to path's folder), like onnx.save_model(save_as_external_data=True)."""
    import os

    m = onnx.ModelProto()
    m.CopyFrom(model)
    onnx.save_model(m, os.fspath(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=threshold, convert_attribute=False)


def external_locations(model_path) -> list[str]:
    m = onnx.load_model(str(model_path), load_external_data=False)
    locs = []
    for t in m.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            locs.append({e.key: e.value for e in t.external_data}["location"])
    return locs


def file_digests(folder) -> dict:
    """{relative path: sha256} of every file under `folder`."""
    import hashlib
    from pathlib import Path

    folder = Path(folder)
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _bad_random_bytes(d):
    p = d / "random.onnx"
    p.write_bytes(np.random.default_rng(1).bytes(4096))
    return p


def _bad_text(d):
    p = d / "notes.onnx"
    p.write_text("this is not a model\n" * 20)
    return p


def _bad_empty(d):
    p = d / "empty.onnx"
    p.write_bytes(b"")
    return p


def _truncated(fraction):
    def build(d):
        data = conv_bn_model()[0].SerializeToString()
        cut = max(1, min(len(data) - 1, int(len(data) * fraction)))
        p = d / f"truncated_{cut}.onnx"
        p.write_bytes(data[:cut])
        return p

    return build


def _external(location_for, write_outside=True):
    """A model whose external-data location is `location_for(d)`; the data file
    itself exists at the target (outside the folder) with the right bytes, so
    only the location rule can refuse it."""

    def build(d):
        from pathlib import Path

        model_dir = d / "model"
        model_dir.mkdir()
        p = model_dir / "m.onnx"
        save_with_external_data(conv_bn_model()[0], p, "m.onnx.data")
        data = (model_dir / "m.onnx.data").read_bytes()
        location, target = location_for(d)
        (model_dir / "m.onnx.data").unlink()
        if write_outside:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            Path(target).write_bytes(data)
        m = onnx.load_model(str(p), load_external_data=False)
        for t in m.graph.initializer:
            for e in t.external_data:
                if e.key == "location":
                    e.value = location
        p.write_bytes(m.SerializeToString())
        return p

    return build


def _missing_external(d):
    p = d / "m.onnx"
    save_with_external_data(conv_bn_model()[0], p, "m.onnx.data")
    (d / "m.onnx.data").unlink()
    return p


def _truncated_external(d):
    p = d / "m.onnx"
    save_with_external_data(conv_bn_model()[0], p, "m.onnx.data")
    data = (d / "m.onnx.data").read_bytes()
    (d / "m.onnx.data").write_bytes(data[: len(data) // 2])
    return p


def _newer_ir(d):
    m = conv_bn_model()[0]
    m.ir_version = onnx.IR_VERSION + 1
    p = d / "new_ir.onnx"
    p.write_bytes(m.SerializeToString())
    return p


def _newer_opset(d):
    m = conv_bn_model()[0]
    m.opset_import[0].version = onnx.defs.onnx_opset_version() + 1
    p = d / "new_opset.onnx"
    p.write_bytes(m.SerializeToString())
    return p


def _invalid_graph(d):
    """Parses, but a node reads a tensor nothing produces."""
    m = conv_bn_model()[0]
    m.graph.node[0].input[0] = "nowhere"
    p = d / "invalid.onnx"
    p.write_bytes(m.SerializeToString())
    return p


def _outside_dir(d):
    return "../outside/m.onnx.data", d / "outside" / "m.onnx.data"


def _outside_abs(d):
    return str((d / "elsewhere" / "w.data").resolve()), d / "elsewhere" / "w.data"


def _outside_nested(d):
    return "sub/../../outside2/w.data", d / "outside2" / "w.data"


# name -> builder(tmp folder) -> path of a model file normfold must refuse.
BAD_MODEL_FILES = {
    "random bytes": _bad_random_bytes,
    "text file": _bad_text,
    "empty file": _bad_empty,
    "truncated 1 byte": _truncated(0.0),
    "truncated 10%": _truncated(0.1),
    "truncated 50%": _truncated(0.5),
    "truncated 90%": _truncated(0.9),
    "truncated last byte": _truncated(1.0),
    "missing external data": _missing_external,
    "truncated external data": _truncated_external,
    "external data ../": _external(_outside_dir),
    "external data absolute": _external(_outside_abs),
    "external data sub/../..": _external(_outside_nested),
    "IR version too new": _newer_ir,
    "opset too new": _newer_opset,
    "invalid graph": _invalid_graph,
}


class record_opens:
    """Context manager recording every path Python opens (audit hook), to prove
    that a refused file was never read."""

    _active: list | None = None
    _installed = False

    def __enter__(self):
        import sys

        if not record_opens._installed:
            sys.addaudithook(record_opens._hook)
            record_opens._installed = True
        self.paths = []
        record_opens._active = self.paths
        return self

    def __exit__(self, *exc):
        record_opens._active = None
        return False

    @staticmethod
    def _hook(event, args):
        import os

        if event == "open" and record_opens._active is not None and args and \
                isinstance(args[0], (str, bytes, os.PathLike)):
            try:
                record_opens._active.append(os.path.realpath(os.fsdecode(os.fspath(args[0]))))
            except Exception:
                pass

"""Portable fused models (normfold.ops.portable, normfold.ops.functions): every
com.normfold op carries a standard-ONNX function body, and the model gives the
PyTorch layer's numbers (a) in onnxruntime with normfold's library, (b) in
onnxruntime without it (bodies inlined), (c) in onnx.reference."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

import normfold
import tests.helpers.norm_models as zoo
from normfold.cli.main import main
from normfold.ops.functions import make_function
from normfold.ops.table import OPS as SIGNATURES
from normfold.ops.portable import carried_functions, embed_functions
from normfold.runtime.session import make_session

RTOL = {TensorProto.FLOAT: 1e-5, TensorProto.DOUBLE: 1e-10, TensorProto.FLOAT16: 2e-3, TensorProto.BFLOAT16: 2e-2}
NP = {TensorProto.FLOAT: np.float32, TensorProto.DOUBLE: np.float64, TensorProto.FLOAT16: np.float16,
      TensorProto.BFLOAT16: ml_dtypes.bfloat16}


def without_library(model: onnx.ModelProto) -> ort.InferenceSession:
    """A plain onnxruntime session: normfold's library is not registered, bodies are inlined."""
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def three_ways(model: onnx.ModelProto, feeds: dict, reference_evaluator: bool = True) -> dict[str, np.ndarray]:
    runs = {"library": make_session(model, threads=1).run(None, feeds)[0],
            "inlined body": without_library(model).run(None, feeds)[0]}
    if reference_evaluator:
        runs["onnx.reference"] = ReferenceEvaluator(model).run(None, feeds)[0]
    return runs


def assert_close(got: np.ndarray, want: np.ndarray, rtol: float, what: str) -> None:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, what
    error = np.abs(got - want).max() / max(1.0, np.abs(want).max())
    assert error <= rtol, f"{what}: relative error {error:.2e} > {rtol:.0e}"


# --------------------------------------------------------------------- fused PyTorch exports

CONFIGS = [("torchscript", 13, True), ("torchscript", 17, False), ("dynamo", 18, True)]
FUSED_FAMILIES = ("groupnorm", "layernorm", "layernorm_cf", "rmsnorm", "frn")


def _cases():
    for name, family in zoo.FAMILY.items():
        if family in FUSED_FAMILIES and name not in zoo.NEGATIVE:
            for exporter, opset, folding in CONFIGS + ([("dynamo", 23, True)] if family == "rmsnorm" else []):
                yield pytest.param(name, exporter, opset, folding, id=f"{name}-{exporter}{opset}")


@pytest.mark.parametrize("name, exporter, opset, folding", list(_cases()))
def test_fused_export_runs_three_ways(name, exporter, opset, folding):
    if zoo.known_failure(name, exporter, opset):
        pytest.skip(zoo.known_failure(name, exporter, opset))
    try:
        model = zoo.export_case(name, exporter=exporter, opset=opset, constant_folding=folding)
    except zoo.ExportError as exc:
        pytest.skip(f"the exporter cannot export this: {str(exc)[:120]}")
    fused, report = normfold.fuse(model, target="custom")
    custom = sorted({n.op_type for n in fused.graph.node if n.domain == "com.normfold"})
    if not custom:  # the exporter wrote a standard op for it, which --target custom keeps
        assert {"LayerNormalization", "RMSNormalization"} & {n.op_type for n in model.graph.node}
        return
    assert carried_functions(fused) == [f"com.normfold.{op}" for op in custom]
    assert not report.skipped, report.skipped
    onnx.checker.check_model(fused, full_check=True)
    assert fused.ir_version <= 10  # what onnxruntime 1.31 loads

    module, args = zoo.make(name), zoo.example_inputs(name)
    feeds = {i.name: a.numpy() for i, a in zip(model.graph.input, args)}
    want = zoo.torch_outputs(module, args)[0]
    for way, got in three_ways(fused, feeds).items():
        assert_close(got, want, 1e-5, f"{way} vs PyTorch")


# ---------------------------------------------------------------- one node, many attributes

def one_node_model(op: str, x: np.ndarray, params: list[np.ndarray], attrs: dict, opset: int = 17,
                   runtime_params: bool = False) -> onnx.ModelProto:
    """A model computing com.normfold `op` on graph input X, with its function body."""
    elem = helper.np_dtype_to_tensor_dtype(x.dtype) if x.dtype != ml_dtypes.bfloat16 else TensorProto.BFLOAT16
    names = list(SIGNATURES[op].inputs[1:len(params) + 1])
    inits = [] if runtime_params else [_tensor(p, n, elem) for p, n in zip(params, names)]
    extra_inputs = [helper.make_tensor_value_info(n, elem, p.shape) for p, n in zip(params, names)] \
        if runtime_params else []
    nodes = [helper.make_node(op, ["X", *names], ["Y"], domain="com.normfold", **attrs)]
    io_elem = elem
    if elem == TensorProto.BFLOAT16:  # onnxruntime's Python API takes no bfloat16 arrays: cast at the edges
        io_elem = TensorProto.FLOAT
        nodes = [helper.make_node("Cast", ["X_float"], ["X"], to=elem), *nodes,
                 helper.make_node("Cast", ["Y"], ["Y_float"], to=io_elem)]
    io = ("X_float", "Y_float") if io_elem != elem else ("X", "Y")
    graph = helper.make_graph(nodes, op, [helper.make_tensor_value_info(io[0], io_elem, x.shape), *extra_inputs],
                              [helper.make_tensor_value_info(io[1], io_elem, x.shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                    helper.make_opsetid("com.normfold", 1)], ir_version=8)
    report = embed_functions(model)
    assert [c.node for c in report.changes] == [op] and not report.skipped
    return model


def _tensor(array: np.ndarray, name: str, elem: int) -> onnx.TensorProto:
    if elem == TensorProto.BFLOAT16:
        return helper.make_tensor(name, elem, array.shape, array.view(np.uint16).tobytes(), raw=True)
    return onnx.numpy_helper.from_array(array, name)


def _gn(x, p, groups, epsilon, activation):
    y = F.group_norm(x, groups, p[0], p[1], epsilon)
    return F.silu(y) if activation == "silu" else y


def _ln(x, p, axis, epsilon, channel_first):
    if channel_first:
        mean = x.mean(1, keepdim=True)
        var = ((x - mean) ** 2).mean(1, keepdim=True)
        shape = [1, -1] + [1] * (x.dim() - 2)
        return (x - mean) / torch.sqrt(var + epsilon) * p[0].reshape(shape) + p[1].reshape(shape)
    return F.layer_norm(x, x.shape[axis:], p[0], p[1], epsilon)


def _frn(x, p, epsilon, use_tlu):
    nu2 = x.pow(2).mean(tuple(range(2, x.dim())), keepdim=True)
    shape = [1, -1] + [1] * (x.dim() - 2)
    y = x / torch.sqrt(nu2 + abs(epsilon)) * p[0].reshape(shape) + p[1].reshape(shape)
    return torch.maximum(y, p[2].reshape(shape)) if use_tlu else y


# op, X shape, parameter shapes, attributes, PyTorch reference
ONE_NODE = [
    ("GroupNorm", (2, 8, 5, 3), [(8,), (8,)], dict(num_groups=4, epsilon=1e-5, activation="none"),
     lambda x, p: _gn(x, p, 4, 1e-5, "none")),
    ("GroupNorm", (2, 8, 5, 3), [(8,), (8,)], dict(num_groups=2, epsilon=1e-3, activation="silu"),
     lambda x, p: _gn(x, p, 2, 1e-3, "silu")),
    ("GroupNorm", (3, 6), [(6,), (6,)], dict(num_groups=6, epsilon=1e-5, activation="silu"),
     lambda x, p: _gn(x, p, 6, 1e-5, "silu")),
    ("GroupNorm", (1, 4, 2, 3, 5), [(4,), (4,)], dict(num_groups=1, epsilon=1e-6, activation="none"),
     lambda x, p: _gn(x, p, 1, 1e-6, "none")),
    ("LayerNorm", (2, 5, 16), [(16,), (16,)], dict(axis=-1, epsilon=1e-5, channel_first=0),
     lambda x, p: _ln(x, p, -1, 1e-5, False)),
    ("LayerNorm", (2, 5, 16), [(5, 16), (5, 16)], dict(axis=1, epsilon=1e-6, channel_first=0),
     lambda x, p: _ln(x, p, 1, 1e-6, False)),
    ("LayerNorm", (4, 6), [(4, 6), (4, 6)], dict(axis=0, epsilon=1e-5, channel_first=0),
     lambda x, p: _ln(x, p, 0, 1e-5, False)),
    ("LayerNorm", (2, 8, 6, 6), [(8,), (8,)], dict(axis=1, epsilon=1e-6, channel_first=1),
     lambda x, p: _ln(x, p, 1, 1e-6, True)),
    ("LayerNorm", (2, 8, 7), [(8,), (8,)], dict(axis=1, epsilon=1e-5, channel_first=1),
     lambda x, p: _ln(x, p, 1, 1e-5, True)),
    ("RMSNorm", (2, 5, 16), [(16,)], dict(axis=-1, epsilon=1e-6),
     lambda x, p: F.rms_norm(x, (16,), p[0], 1e-6)),
    ("RMSNorm", (2, 5, 16), [(5, 16)], dict(axis=-2, epsilon=1e-5),
     lambda x, p: F.rms_norm(x, (5, 16), p[0], 1e-5)),
    ("FilterResponseNorm", (2, 3, 6, 6), [(1, 3, 1, 1)] * 3, dict(epsilon=1e-6, use_tlu=1),
     lambda x, p: _frn(x, p, 1e-6, True)),
    ("FilterResponseNorm", (2, 3, 6, 6), [(3,)] * 3, dict(epsilon=-1e-4, use_tlu=0),
     lambda x, p: _frn(x, p, -1e-4, False)),
    ("FilterResponseNorm", (2, 3, 10), [(3,)] * 3, dict(epsilon=1e-3, use_tlu=1),
     lambda x, p: _frn(x, p, 1e-3, True)),
]


def _one_node_params():
    for i, case in enumerate(ONE_NODE):
        for elem in (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16):
            yield pytest.param(*case, elem, id=f"{case[0]}-{i}-{TensorProto.DataType.Name(elem).lower()}")


@pytest.mark.parametrize("op, shape, param_shapes, attrs, reference, elem", list(_one_node_params()))
def test_one_node_runs_three_ways(op, shape, param_shapes, attrs, reference, elem):
    rng = np.random.default_rng(abs(hash((op, shape))) % 2**32)
    dtype = NP[elem]
    x = (rng.standard_normal(shape) * 2 + 0.5).astype(dtype)
    params = [(rng.standard_normal(s) + 0.2).astype(dtype) for s in param_shapes]
    model = one_node_model(op, x, params, attrs)
    onnx.checker.check_model(model, full_check=True)
    with torch.no_grad():
        want = reference(torch.from_numpy(x.astype(np.float64)), [torch.from_numpy(p.astype(np.float64))
                                                                 for p in params]).numpy()
    for way, got in three_ways(model, {"X": x}).items():
        assert got.dtype == dtype, way
        assert_close(got, want, RTOL[elem], f"{way} vs PyTorch")


@pytest.mark.parametrize("op, shape, param_shapes, attrs, reference", [c[:5] for c in ONE_NODE[::3]])
def test_bfloat16_with_and_without_library(op, shape, param_shapes, attrs, reference):
    rng = np.random.default_rng(7)
    x = rng.standard_normal(shape).astype(ml_dtypes.bfloat16)
    params = [(rng.standard_normal(s) + 0.2).astype(ml_dtypes.bfloat16) for s in param_shapes]
    model = one_node_model(op, x, params, attrs)
    with torch.no_grad():
        want = reference(torch.from_numpy(x.astype(np.float64)), [torch.from_numpy(p.astype(np.float64))
                                                                 for p in params]).numpy()
    for way, got in three_ways(model, {"X_float": x.astype(np.float32)}, reference_evaluator=False).items():
        assert_close(got, want, RTOL[TensorProto.BFLOAT16], f"{way} vs PyTorch")


@pytest.mark.parametrize("dim, shape", [(0, (6, 3, 3, 3)), (1, (6, 4, 3)), (0, (5, 7)), (1, (5, 7)), (3, (2, 3, 4, 5))])
@pytest.mark.parametrize("opset", [13, 18])
def test_weight_norm_runs_three_ways(dim, shape, opset):
    rng = np.random.default_rng(dim)
    v = rng.standard_normal(shape).astype(np.float32)
    g_shape = [1] * len(shape)
    g_shape[dim] = shape[dim]
    g = (rng.random(g_shape) + 0.5).astype(np.float32)
    model = one_node_model("WeightNorm", v, [g], {"dim": dim}, opset=opset, runtime_params=True)
    want = torch._weight_norm(torch.from_numpy(v).double(), torch.from_numpy(g).double(), dim).numpy()
    for way, got in three_ways(model, {"X": v, "g": g}).items():
        assert_close(got, want, 1e-5, f"{way} vs torch._weight_norm")


def test_every_op_has_a_body_for_every_opset():
    for op in SIGNATURES:
        for opset in (11, 13, 17, 18, 21, 23):
            function = make_function(op, TensorProto.FLOAT, opset)
            assert function.opset_import[0].version == opset
            ops = {n.op_type for n in function.node}
            assert ops <= {s.name for s in onnx.defs.get_all_schemas()}, ops
    with pytest.raises(ValueError, match="opset >= 11"):
        make_function("GroupNorm", TensorProto.FLOAT, 10)
    with pytest.raises(ValueError, match="INT32"):
        make_function("GroupNorm", TensorProto.INT32, 17)


# ------------------------------------------------------------------ embedding rules

def test_bodies_only_for_ops_used_once_each_and_defaults_written():
    model = zoo.export_case("gn2d_g4_silu", exporter="torchscript", opset=17, constant_folding=True)
    doubled = onnx.ModelProto()
    doubled.CopyFrom(model)
    fused, _ = normfold.fuse(doubled, target="custom")
    assert carried_functions(fused) == ["com.normfold.GroupNorm"]
    again = onnx.ModelProto()
    again.CopyFrom(fused)
    embed_functions(again)  # re-embedding replaces, never duplicates
    assert carried_functions(again) == ["com.normfold.GroupNorm"]
    [node] = [n for n in fused.graph.node if n.domain == "com.normfold"]
    assert {a.name for a in node.attribute} == {"num_groups", "epsilon", "activation"}


def test_no_portable_leaves_bodies_out():
    model = zoo.export_case("ln2d_convnext", exporter="torchscript", opset=17, constant_folding=True)
    fused, _ = normfold.fuse(model, target="custom", portable=False)
    assert not fused.functions
    with pytest.raises(Exception, match="LayerNorm"):
        without_library(fused)


def test_node_without_optional_input_is_reported_not_served():
    x = np.zeros((2, 5, 16), np.float32)
    node = helper.make_node("RMSNorm", ["X"], ["Y"], domain="com.normfold", axis=-1, epsilon=1e-6)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, x.shape)],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, x.shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.normfold", 1)], ir_version=8)
    report = embed_functions(model)
    assert not model.functions and "optional input" in report.skipped[0].reason


def test_fuse_writes_neutral_optional_inputs():
    """LayerNorm without bias, RMSNorm without γ and FRN without TLU get explicit
    neutral inputs, so the bodies can serve them; numbers unchanged."""
    for name, op, count, exporter, opset in [("ln_nobias", "LayerNorm", 3, "torchscript", 13),
                                             ("rms_nn_noaffine", "RMSNorm", 2, "dynamo", 18),
                                             ("frn_no_tlu", "FilterResponseNorm", 4, "torchscript", 17)]:
        model = zoo.export_case(name, exporter=exporter, opset=opset)
        fused, _ = normfold.fuse(model, target="custom")
        [node] = [n for n in fused.graph.node if n.op_type == op]
        assert len(node.input) == count and all(node.input), (name, node.input)
        feeds = {model.graph.input[0].name: zoo.example_inputs(name)[0].numpy()}
        want = zoo.torch_outputs(zoo.make(name), zoo.example_inputs(name))[0]
        for way, got in three_ways(fused, feeds).items():
            assert_close(got, want, 1e-5, f"{name}: {way} vs PyTorch")


def test_portable_model_runs_without_normfold(tmp_path):
    model = zoo.export_case("gn2d_g4_silu", exporter="torchscript", opset=17, constant_folding=True)
    fused, _ = normfold.fuse(model, target="custom")
    path = tmp_path / "fused.onnx"
    onnx.save(fused, path)
    x = zoo.example_inputs("gn2d_g4_silu")[0].numpy()
    np.save(tmp_path / "x.npy", x)
    script = textwrap.dedent(f"""
        import sys
        sys.modules["normfold"] = None  # any import of normfold fails
        import numpy as np, onnxruntime as ort
        s = ort.InferenceSession({str(path)!r}, providers=["CPUExecutionProvider"])
        y = s.run(None, {{s.get_inputs()[0].name: np.load({str(tmp_path / 'x.npy')!r})}})[0]
        np.save({str(tmp_path / 'y.npy')!r}, y)
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    want = zoo.torch_outputs(zoo.make("gn2d_g4_silu"), zoo.example_inputs("gn2d_g4_silu"))[0]
    assert_close(np.load(tmp_path / "y.npy"), want, 1e-5, "without normfold")


def test_cli_fuse_portable_and_inspect(tmp_path):
    model = zoo.export_case("frn_tlu_learned_eps", exporter="torchscript", opset=17, constant_folding=True)
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    runner = CliRunner()
    for flag, portable in (("--portable", True), ("--no-portable", False)):
        out = tmp_path / f"m{flag}.onnx"
        result = runner.invoke(main, ["fuse", str(src), "-o", str(out), "--target", "custom", flag, "-q"])
        assert result.exit_code == 0, result.output
        result = runner.invoke(main, ["inspect", str(out)])
        assert result.exit_code == 0, result.output
        assert ("functions: com.normfold.FilterResponseNorm" in result.output) == portable
        assert ("runs with or without normfold's library" in result.output) == portable
        assert ("needs normfold's library" in result.output) != portable

"""`normfold optimize` (every pass, then verification of what is written),
`normfold fold-wn` (weight-side folds), `normfold inspect` and the cleanup pass."""

from __future__ import annotations

import hashlib
import json
import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from onnx import TensorProto, helper
from torch import nn

import normfold
import tests.helpers.norm_models as zoo
from tests.helpers.graphs import ort_run
from normfold.cli.main import main
from normfold.runtime.session import make_session


class CosineHead(nn.Module):
    """Cosine-normalised weights (Luo et al. 2017): s · (x/‖x‖)·(w/‖w‖)ᵀ."""

    def __init__(self, cin, cout):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin))

    def forward(self, x):
        return 10 * F.linear(F.normalize(x, dim=1), F.normalize(self.weight, dim=1))


class Everything(nn.Module):
    """Conv→BN, weight-normed conv, GroupNorm+SiLU, ConvNeXt LayerNorm, FRN, a
    cosine head and a dropout: one model for every pass."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.wn = nn.utils.parametrizations.weight_norm(nn.Conv2d(8, 8, 3, padding=1))
        self.gn = nn.GroupNorm(4, 8)
        self.ln = zoo.LayerNorm2d(8)
        self.frn = zoo.FRN(8)
        self.drop = nn.Dropout(0.3)
        self.head = CosineHead(8, 5)

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x)))
        y = F.silu(self.gn(self.wn(y)))
        y = self.frn(self.ln(y))
        return self.head(self.drop(y).mean((2, 3)))


def everything(exporter="torchscript", opset=17, folding=False) -> tuple[nn.Module, onnx.ModelProto, np.ndarray]:
    module = zoo.randomize_norms(Everything(), 3).eval()
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    model = zoo.export(module, (x,), exporter=exporter, opset=opset, constant_folding=folding)
    return module, model, x.numpy()


def write(tmp_path, model, name="m.onnx"):
    path = tmp_path / name
    onnx.save(model, path)
    return path


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


@pytest.mark.parametrize("exporter, opset, folding", [("torchscript", 13, False), ("torchscript", 17, True),
                                                      ("dynamo", 18, False)])
def test_optimize_everything_matches_pytorch(tmp_path, exporter, opset, folding):
    module, model, x = everything(exporter, opset, folding)
    src = write(tmp_path, model)
    before = digest(src)
    out = tmp_path / "o.onnx"
    result = invoke("optimize", src, "-o", out, "--json", tmp_path / "r.json", "-q", "--no-measure")  # no timing noise
    assert result.exit_code == 0, result.output
    assert digest(src) == before
    report = json.loads((tmp_path / "r.json").read_text())
    assert [p["pass"] for p in report["passes"]] == ["canonicalize", "fold-wn", "fold-bn", "fuse", "fold-affine", "cleanup", "portable"]
    assert report["written"] and report["verification"]["passed"]
    optimized = onnx.load(out)
    left = set(ops(optimized))
    assert not left & {"BatchNormalization", "InstanceNormalization", "Sqrt", "Identity", "Dropout"}, left
    custom = sorted(n.op_type for n in optimized.graph.node if n.domain == "com.normfold")
    assert custom == ["FilterResponseNorm", "GroupNorm", "LayerNorm"]
    assert sorted(f.name for f in optimized.functions) == custom
    with torch.no_grad():
        want = module(torch.from_numpy(x)).numpy()
    got = make_session(optimized).run(None, {optimized.graph.input[0].name: x})[0]
    assert np.abs(got - want).max() <= 1e-5 * max(1.0, np.abs(want).max())


def test_optimize_python_api_and_pass_subset():
    _, model, x = everything()
    only_bn, reports = normfold.optimize(model, passes=("fold-bn",))
    assert [r.name for r in reports] == ["fold-bn"]
    assert "BatchNormalization" not in ops(only_bn) and "InstanceNormalization" in ops(only_bn)
    feeds = {model.graph.input[0].name: x}
    assert np.allclose(make_session(only_bn).run(None, feeds)[0], ort_run(model, feeds)[0], atol=1e-5)


def test_optimize_refuses_output_that_fails_verification(tmp_path, monkeypatch):
    _, model, _ = everything()
    src = write(tmp_path, model)
    before = digest(src)

    def corrupt(graph):  # a broken pass: changes a weight
        conv = next(n for n in graph.nodes if n.op == "Conv")
        conv.inputs[1].values = conv.inputs[1].values * 1.5
        return normfold.report.PassReport("corrupt")

    import normfold.pipeline.files as files

    real = files.steps
    monkeypatch.setattr(files, "steps", lambda names, **options: real(names, **options) + [(corrupt, {})])
    out = tmp_path / "o.onnx"
    result = invoke("optimize", src, "-o", out)
    assert result.exit_code == 1, result.output
    assert "FAIL" in result.output and "was not written" in result.output
    assert not out.exists() and not list(tmp_path.glob(".normfold-staged-*"))
    result = invoke("optimize", src, "--inplace")
    assert result.exit_code == 1 and digest(src) == before
    result = invoke("optimize", src, "-o", out, "--no-verify", "-q")
    assert result.exit_code == 0 and out.exists()


@pytest.mark.parametrize("args, message", [
    (["--passes", "fold-bn,bogus"], "unknown pass(es) bogus"),
    (["--passes", "recalibrate"], "go together"),
    (["--passes", "fold-bn", "--data", "calib.npz"], "go together"),
])
def test_optimize_bad_options(tmp_path, args, message):
    _, model, _ = everything()
    src = write(tmp_path, model)
    (tmp_path / "calib.npz").write_bytes(b"")
    result = CliRunner().invoke(main, ["optimize", str(src), "-o", str(tmp_path / "o.onnx"),
                                       *[str(tmp_path / a) if a.endswith(".npz") else a for a in args]])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "o.onnx").exists()


def test_optimize_keeps_external_data(tmp_path):
    _, model, x = everything()
    feeds = {model.graph.input[0].name: x}
    want = ort_run(model, feeds)[0]
    src = tmp_path / "ext.onnx"
    onnx.external_data_helper.convert_model_to_external_data(model, all_tensors_to_one_file=True,
                                                             location="ext.weights", size_threshold=0)
    onnx.save(model, src)
    out = tmp_path / "o.onnx"
    result = invoke("optimize", src, "-o", out, "-q")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "o.onnx.data").exists()
    assert np.allclose(make_session(str(out)).run(None, feeds)[0], want, atol=1e-5)


# ------------------------------------------------------------------------------- fold-wn

def _cosine_export(exporter: str, folding: bool) -> tuple[nn.Module, onnx.ModelProto, np.ndarray]:
    torch.manual_seed(1)
    module = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), CosineHead(8 * 4 * 4, 6)).eval()
    x = torch.randn(2, 3, 6, 6)
    return module, zoo.export(module, (x,), exporter=exporter, opset=17 if exporter == "torchscript" else 18,
                              constant_folding=folding), x.numpy()


@pytest.mark.parametrize("case", ["wn_conv_dim0", "wn_linear_dim1", "wn_conv_legacy", "ws_conv_std", "cosine"])
@pytest.mark.parametrize("exporter, folding", [("torchscript", False), ("torchscript", True), ("dynamo", False)])
def test_fold_wn_computes_weights_offline(tmp_path, case, exporter, folding):
    if case == "cosine":
        module, model, x = _cosine_export(exporter, folding)
        args = (torch.from_numpy(x),)
    else:
        model = zoo.export_case(case, exporter=exporter, opset=17 if exporter == "torchscript" else 18,
                                constant_folding=folding)
        module, args = zoo.make(case), zoo.example_inputs(case)
    src = write(tmp_path, model)
    out = tmp_path / "o.onnx"
    result = invoke("fold-wn", src, "-o", out, "--json", "-")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    folded = onnx.load(out)
    weight_side = {"ReduceL2", "LpNormalization", "Sqrt", "ReduceMean"}
    layers = [n for n in folded.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    for layer in layers:  # every layer weight is now a plain initializer
        weight = layer.input[1]
        assert weight in {i.name for i in folded.graph.initializer} or \
            any(n.output[0] == weight and n.op_type in ("Constant", "Transpose") for n in folded.graph.node), weight
    if case != "cosine":
        assert not weight_side & set(ops(folded)), ops(folded)
    assert report["passes"][0]["changed"] >= 1 or not weight_side & set(ops(model))
    with torch.no_grad():
        want = module(*args)
    want = (want[0] if isinstance(want, tuple) else want).numpy()
    feeds = {i.name: a.numpy() for i, a in zip(model.graph.input, args)}
    got = make_session(folded).run(None, feeds)[0]
    assert np.abs(got - want).max() <= 1e-5 * max(1.0, np.abs(want).max())


# ------------------------------------------------------------------------------- inspect, cleanup

def test_inspect_plain_and_bad_input(tmp_path):
    _, model, _ = everything()
    src = write(tmp_path, model)
    result = invoke("inspect", src, "--json", "-")
    assert result.exit_code == 0
    report = json.loads(result.output)
    assert report["normfold_ops"] == [] and report["runs_without_library"] and report["ops"]["BatchNormalization"] == 1
    (tmp_path / "bad.onnx").write_bytes(src.read_bytes()[:100])
    result = invoke("inspect", tmp_path / "bad.onnx")
    assert result.exit_code == 2 and "normfold: error:" in result.output


def _identity_model(output_identity: bool):
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Identity", ["r"], ["i"]),
             helper.make_node("Dropout", ["i"], ["d"]), helper.make_node("Neg", ["d"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])]
    if output_identity:
        nodes += [helper.make_node("Identity", ["x"], ["x_copy"]), helper.make_node("Identity", ["y"], ["y_copy"])]
        outputs += [helper.make_tensor_value_info("x_copy", TensorProto.FLOAT, [3]),
                    helper.make_tensor_value_info("y_copy", TensorProto.FLOAT, [3])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])], outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_cleanup_removes_no_ops_and_keeps_graph_output_names():
    from normfold.passes.cleanup import cleanup

    model = _identity_model(output_identity=True)
    cleaned, report = normfold.run_pass(model, cleanup)
    assert [o.name for o in cleaned.graph.output] == ["y", "x_copy", "y_copy"]
    assert ops(cleaned).count("Identity") == 2  # x→x_copy must stay; y→y_copy stays (y is an output too)
    assert "Dropout" not in ops(cleaned)
    x = {"x": np.array([-1.0, 0.5, 2.0], np.float32)}
    for got, want in zip(ort_run(cleaned, x), ort_run(model, x)):
        assert np.array_equal(got, want)
    assert {c.how for c in report.changes} == {"identity", "inference dropout"}
    assert len(report.skipped) == 2


def test_cleanup_output_identity_rewired_to_producer():
    from normfold.passes.cleanup import cleanup

    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Identity", ["r"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    cleaned, _ = normfold.run_pass(model, cleanup)
    assert ops(cleaned) == ["Relu"] and cleaned.graph.node[0].output[0] == "y"


def test_export_optimize_uses_every_pass(tmp_path):
    from normfold.tools.export import export

    module = zoo.make("gn2d_g4_silu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = export(module, ["2x3x8x8"], tmp_path / "e.onnx", dynamo=False, opset=17, optimize=True, verify=True)
    assert result.passed
    assert [r.name for r in result.passes] == ["canonicalize", "fold-wn", "fold-bn", "fuse", "fold-affine", "cleanup", "portable"]
    exported = onnx.load(tmp_path / "e.onnx")
    assert "GroupNorm" in ops(exported) and exported.functions


def test_optimize_with_data_recalibrates_then_folds(tmp_path):
    _, model, x = everything()
    src = write(tmp_path, model)
    rng = np.random.default_rng(5)
    name = model.graph.input[0].name
    for i, n in enumerate((2, 3)):  # target-domain data: shifted and scaled
        np.savez(tmp_path / f"b{i}.npz", **{name: (rng.standard_normal((2, 3, 8, 8)) * 3 + 1).astype(np.float32)})
    calib = tmp_path / "calib"
    calib.mkdir()
    for f in tmp_path.glob("b*.npz"):
        f.rename(calib / f.name)
    out, reference = tmp_path / "o.onnx", tmp_path / "r.onnx"
    result = invoke("optimize", src, "-o", out, "--data", calib, "--json", "-")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert [p["pass"] for p in report["passes"]][:4] == ["recalibrate", "canonicalize", "fold-wn", "fold-bn"]
    assert report["verification"]["passed"]
    assert invoke("recalibrate", src, "--data", calib, "-o", reference, "-q").exit_code == 0
    recalibrated = onnx.load(reference)
    feeds = {name: x}
    got = make_session(str(out)).run(None, feeds)[0]
    want, before = ort_run(recalibrated, feeds)[0], ort_run(model, feeds)[0]
    assert np.abs(got - want).max() <= 1e-5 * max(1.0, np.abs(want).max())
    assert np.abs(want - before).max() > 1e-3  # recalibration changed the numbers


def test_sessions_for_models_over_the_protobuf_limit(monkeypatch):
    """In-memory models over 2 GB reach onnxruntime with their large weights as
    external initializers (limit lowered here so a small model takes that path)."""
    import normfold.runtime.session as runtime
    from normfold.verify.run import verify

    _, model, x = everything()
    feeds = {model.graph.input[0].name: x}
    want = ort_run(model, feeds)[0]
    monkeypatch.setattr(runtime, "PROTOBUF_LIMIT", 1000)
    assert np.array_equal(make_session(model).run(None, feeds)[0], want)
    optimized, _ = normfold.optimize(model)
    assert verify(optimized, model, inputs=feeds).passed

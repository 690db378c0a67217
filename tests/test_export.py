"""`normfold export`: exporter settings, IR version cap, --optimize, --verify, bad input."""

from __future__ import annotations

import json

import onnx
import pytest
from click.testing import CliRunner

import tests.helpers.models_for_tests as mft
from normfold.cli.main import main
from normfold.tools.export import MAX_IR_VERSION, cap_ir_version


def export_cli(*args):
    return CliRunner().invoke(main, ["export", *map(str, args)], catch_exceptions=False)


def test_legacy_export_with_verify(tmp_path):
    out = tmp_path / "resnet.onnx"
    result = export_cli("tests.helpers.models_for_tests:make_resnetish", "--input-shape", "2x3x16x16", "-o", out, "--legacy",
                        "--opset", "17", "--verify", "--json", "-")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["exporter"] == "legacy" and report["opset"] == 17
    assert report["verification"]["passed"] and report["inputs"] == {"x": [[2, 3, 16, 16], "float32"]}
    model = onnx.load(str(out))
    assert model.ir_version <= MAX_IR_VERSION
    assert [i.name for i in model.graph.input] == ["x"] and [o.name for o in model.graph.output] == ["output"]


def test_dynamo_export_dynamic_batch_optimize_verify(tmp_path):
    out = tmp_path / "gn.onnx"
    result = export_cli("tests.helpers.models_for_tests:make_groupnorm", "--input-shape", "x=2x3x8x8", "-o", out,
                        "--dynamic-batch", "--optimize", "--verify")
    assert result.exit_code == 0, result.output
    assert "PASS" in result.output and "fold-bn" in result.output
    model = onnx.load(str(out))
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    assert model.ir_version <= MAX_IR_VERSION


def test_multiple_inputs_and_outputs(tmp_path):
    out = tmp_path / "two.onnx"
    result = export_cli("tests.helpers.models_for_tests:make_two_in_out", "--input-shape", "image=1x3x8x8",
                        "--input-shape", "bias=1x4x8x8", "-o", out, "--legacy", "--optimize", "--verify")
    assert result.exit_code == 0, result.output
    model = onnx.load(str(out))
    assert [i.name for i in model.graph.input] == ["image", "bias"]
    assert [o.name for o in model.graph.output] == ["output_0", "output_1"]
    assert not any(n.op_type == "BatchNormalization" for n in model.graph.node)


def test_integer_inputs(tmp_path):
    out = tmp_path / "tokens.onnx"
    result = export_cli("tests.helpers.models_for_tests:make_tokens", "--input-shape", "tokens=2x7:int64", "-o", out,
                        "--legacy", "--verify")
    assert result.exit_code == 0, result.output
    assert onnx.load(str(out)).graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT64


def test_weights_are_loaded(tmp_path):
    import torch

    module = mft.make_groupnorm()
    with torch.no_grad():
        module.conv2.weight.mul_(3)
    weights = tmp_path / "w.pt"
    torch.save(module.state_dict(), weights)
    out = tmp_path / "gn.onnx"
    result = export_cli("tests.helpers.models_for_tests:make_groupnorm", "--weights", weights, "--input-shape", "1x3x8x8",
                        "-o", out, "--legacy")
    assert result.exit_code == 0, result.output
    from normfold.verify.run import verify

    assert verify(out, module).passed and not verify(out, mft.make_groupnorm()).passed


@pytest.mark.parametrize("args, expected", [
    (["tests.helpers.models_for_tests:make_two_in_out", "--input-shape", "image=1x3x8x8"],
     "forward(image, bias) needs a shape for bias"),
    (["tests.helpers.models_for_tests:make_two_in_out", "--input-shape", "1x3x8x8"], "has no input name and there are 2 inputs"),
    (["tests.helpers.models_for_tests:make_groupnorm", "--input-shape", "y=1x3x8x8"], "shape given for 'y', which is not an input"),
    (["tests.helpers.models_for_tests:make_groupnorm", "--input-shape", "1x3x8x8:complex7"], "unknown dtype 'complex7'"),
    (["tests.helpers.models_for_tests:make_not_a_module", "--input-shape", "1x3x8x8"], "not a torch.nn.Module"),
    (["nope.nope:make", "--input-shape", "1x3x8x8"], "cannot import module 'nope.nope'"),
    (["tests.helpers.models_for_tests:make_groupnorm", "--input-shape", "1x5x8x8"], "the module failed on example inputs x[1x5x8x8]"),
])
def test_bad_input_writes_nothing(tmp_path, args, expected):
    out = tmp_path / "model.onnx"
    result = export_cli(*args, "-o", out, "--legacy")
    assert result.exit_code == 2, result.output
    assert expected in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_missing_output_folder(tmp_path):
    out = tmp_path / "no" / "model.onnx"
    result = export_cli("tests.helpers.models_for_tests:make_groupnorm", "--input-shape", "1x3x8x8", "-o", out, "--legacy")
    assert result.exit_code == 2 and "does not exist" in result.stderr


def test_ir_version_is_capped():
    model = mft.load_copy(mft.onnx_file("make_groupnorm"))
    model.ir_version = 14
    cap_ir_version(model)
    assert model.ir_version == MAX_IR_VERSION

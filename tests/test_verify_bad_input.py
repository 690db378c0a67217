"""`normfold verify` on bad input: one clear line on stderr, exit 2, nothing written."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import tests.helpers.models_for_tests as mft
from normfold.cli.main import main


def verify_fails(tmp_path, candidate, reference, *extra) -> str:
    """Run verify with --json into tmp_path; assert exit 2, one stderr line and no
    JSON written; return the message."""
    json_path = tmp_path / "report.json"
    args = ["verify", str(candidate), "--against", str(reference), *map(str, extra), "--json", str(json_path)]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 2, result.output
    assert not json_path.exists()
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("normfold: error: ")
    return lines[0]


@pytest.fixture(scope="module")
def resnet():
    return mft.onnx_file("make_resnetish")


@pytest.mark.parametrize("reference, expected", [
    ("no_such_package.nets:make", "cannot import module 'no_such_package.nets'"),
    ("tests.helpers.models_for_tests:make_nothing", "module 'tests.helpers.models_for_tests' has no attribute 'make_nothing'"),
    ("tests.helpers.models_for_tests:NOT_CALLABLE", "'NOT_CALLABLE' is a int, not callable"),
    ("tests.helpers.models_for_tests:make_not_a_module", "returned a dict, not a torch.nn.Module"),
    ("no/such/file.onnx", "no such file, and not of the form package.module:callable"),
])
def test_bad_module_reference(tmp_path, resnet, reference, expected):
    assert expected in verify_fails(tmp_path, resnet, reference)


def test_weights_that_do_not_match_list_missing_and_unexpected_keys(tmp_path, resnet):
    weights = tmp_path / "gn.pt"
    torch.save(mft.make_groupnorm().state_dict(), weights)
    message = verify_fails(tmp_path, resnet, "tests.helpers.models_for_tests:make_resnetish", "--weights", weights)
    assert "weights do not match the module" in message
    assert "missing keys: stem.weight" in message and "layer1.0.bn1.running_mean" in message
    assert "unexpected keys: conv1.weight" in message and "norm.bias" in message


def test_weights_with_wrong_shapes(tmp_path, resnet):
    state = mft.make_resnetish().state_dict()
    state["fc.weight"] = torch.zeros(7, 8)
    weights = tmp_path / "bad.pt"
    torch.save(state, weights)
    message = verify_fails(tmp_path, resnet, "tests.helpers.models_for_tests:make_resnetish", "--weights", weights)
    assert "shape mismatch (file vs module): fc.weight [7, 8] vs [5, 8]" in message


def test_weights_file_that_is_not_a_state_dict(tmp_path, resnet):
    weights = tmp_path / "module.pt"
    torch.save(mft.make_resnetish(), weights)  # a pickled module: refused by weights_only=True
    message = verify_fails(tmp_path, resnet, "tests.helpers.models_for_tests:make_resnetish", "--weights", weights)
    assert "weights_only=True" in message


def test_onnx_inputs_that_do_not_fit_forward(tmp_path):
    two_inputs = mft.onnx_file("make_two_in_out")
    message = verify_fails(tmp_path, two_inputs, "tests.helpers.models_for_tests:make_resnetish")
    assert "has 2 inputs (image, bias)" in message and "forward takes 1 tensor arguments" in message


def test_number_of_outputs_differs(tmp_path, resnet):
    message = verify_fails(tmp_path, resnet, "tests.helpers.models_for_tests:make_one_in_two_out")
    assert "the candidate has 1 outputs" in message and "the reference has 2" in message


def test_number_of_inputs_differs_between_onnx_models(tmp_path, resnet):
    message = verify_fails(tmp_path, resnet, mft.onnx_file("make_two_in_out"))
    assert "has 1 inputs (x) but the reference ONNX model has 2 (image, bias)" in message


def _npz(tmp_path, arrays) -> str:
    path = tmp_path / "inputs.npz"
    np.savez(path, **arrays)
    return str(path)


@pytest.mark.parametrize("arrays, expected", [
    ({"y": np.zeros((1, 3, 16, 16), np.float32)}, "missing x: float32[1,3,16,16]; not model inputs: y"),
    ({"x": np.zeros((1, 3, 8, 8), np.float32)}, "'x' has shape [1, 3, 8, 8], the model wants x: float32[1,3,16,16]"),
    ({"x": np.zeros((1, 3, 16, 16), np.float64)}, "'x' is float64, the model wants float32"),
])
def test_npz_that_does_not_match_the_inputs(tmp_path, resnet, arrays, expected):
    message = verify_fails(tmp_path, resnet, resnet, "--inputs", _npz(tmp_path, arrays))
    assert "inputs.npz: does not match the model inputs" in message and expected in message


def test_npz_that_is_not_an_npz(tmp_path, resnet):
    bad = tmp_path / "inputs.npz"
    bad.write_text("hello")
    assert "not a readable .npz file" in verify_fails(tmp_path, resnet, resnet, "--inputs", bad)


def test_reference_of_unknown_format(tmp_path, resnet):
    text = tmp_path / "model.bin"
    text.write_bytes(b"\x00garbage")
    assert "unknown reference format" in verify_fails(tmp_path, resnet, text)


def test_checkpoint_as_reference_says_to_use_weights(tmp_path, resnet):
    checkpoint = tmp_path / "resnet.pt"
    torch.save(mft.make_resnetish().state_dict(), checkpoint)
    message = verify_fails(tmp_path, resnet, checkpoint)
    assert "is a PyTorch checkpoint" in message and "--weights" in message


def test_missing_shape_for_dynamic_dimension(tmp_path):
    dynamic = mft.onnx_file("make_groupnorm", dynamic_batch=True)
    message = verify_fails(tmp_path, dynamic, dynamic)
    assert "input 'x' has dynamic dimension 0 ('batch')" in message
    assert "--shape x=Nx3x8x8" in message


@pytest.mark.parametrize("shape, expected", [
    ("y=1x3x8x8", "shape given for 'y', which is not an input; inputs: x"),
    ("x=1x3x8", "has 3 dimensions but the model declares 4"),
    ("x=2x3x9x8", "dimension 2 is fixed to 8 in the model, not 9"),
    ("x=1x3xAx8", "is not of the form 1x3x224x224"),
])
def test_bad_shape_option(tmp_path, shape, expected):
    dynamic = mft.onnx_file("make_groupnorm", dynamic_batch=True)
    assert expected in verify_fails(tmp_path, dynamic, dynamic, "--shape", shape)


def test_weights_with_an_onnx_reference(tmp_path, resnet):
    weights = tmp_path / "w.pt"
    torch.save({}, weights)
    assert "--weights goes with a package.module:callable" in verify_fails(tmp_path, resnet, resnet,
                                                                          "--weights", weights)


def test_candidate_that_is_not_onnx(tmp_path, resnet):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    assert "not an ONNX model" in verify_fails(tmp_path, bad, resnet)

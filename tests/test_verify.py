"""`normfold verify`: equivalence passes, mismatches fail with exit 1, `--localize`
names the corrupted layer, NaN/Inf always fails, JSON for CI."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

import tests.helpers.models_for_tests as mft
from normfold import fold_bn
from normfold.cli.main import main
from normfold.verify.compare import compare_arrays, default_tolerance, match_outputs
from normfold.io.inputs import generate_inputs, input_specs
from normfold.verify.run import verify


def run_cli(*args: str):
    """Invoke `normfold` in-process; return the click Result."""
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize("factory", ["make_resnetish", "make_groupnorm", "make_layernorm", "make_two_in_out"])
def test_exported_models_match_their_module(factory):
    result = run_cli("verify", mft.onnx_file(factory), "--against", f"tests.helpers.models_for_tests:{factory}",
                     "--samples", "2", "--json", "-")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["passed"] and report["reference_kind"] == "pytorch" and report["samples"] == 2
    assert report["matched_by"] == "position"
    assert all(o["max_abs"] < 1e-4 and o["cosine"] > 0.9999 for o in report["outputs"])


def test_folded_model_matches_unfolded_export_by_name_and_localize_sees_no_divergence(tmp_path):
    raw = mft.onnx_file("make_resnetish", folding=False)
    folded, _ = fold_bn(mft.load_copy(raw))
    candidate = mft.save(folded, tmp_path, "folded.onnx")
    result = run_cli("verify", candidate, "--against", raw, "--localize", "--json", "-")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["matched_by"] == "name"
    assert report["localization"]["first"] is None and report["localization"]["checked"] > 5


def test_correct_folded_export_is_not_called_divergent_against_pytorch():
    report = verify(mft.onnx_file("make_resnetish"), mft.make_resnetish(), localize=True)
    assert report.passed
    loc = report.localization
    assert loc.first is None
    assert any(f.startswith("layer1.0.conv1 (matches layer1.0.bn1") for f in loc.folded)
    assert any(u.startswith("layer1.0.bn1") for u in loc.unmapped)


@pytest.fixture
def corrupted(tmp_path):
    """The resnet export with one weight of layer1.1.conv2 changed."""
    model = mft.perturb(mft.load_copy(mft.onnx_file("make_resnetish")), "/layer1/layer1.1/conv2/")
    return mft.save(model, tmp_path, "corrupted.onnx")


def test_corrupted_weight_fails_and_localize_names_the_layer_against_pytorch(corrupted):
    result = run_cli("verify", corrupted, "--against", "tests.helpers.models_for_tests:make_resnetish", "--localize")
    assert result.exit_code == 1, result.output
    assert "FAIL" in result.output
    assert "first divergent module: layer1.1.conv2 (Conv2d)" in result.output


def test_corrupted_weight_localized_against_onnx(corrupted, tmp_path):
    json_path = tmp_path / "report.json"
    result = run_cli("verify", corrupted, "--against", mft.onnx_file("make_resnetish"), "--localize",
                     "--json", json_path)
    assert result.exit_code == 1, result.output
    first = json.loads(json_path.read_text())["localization"]["first"]
    assert first["where"] == "/layer1/layer1.1/conv2/Conv" and first["op"] == "Conv"
    assert first["max_abs"] > 1e-3 and not first["passed"]


def test_corrupted_dynamo_export_localized_against_pytorch(tmp_path):
    # the dynamo exporter fuses conv2 into bn2 and names the fused Conv after bn2
    model = mft.perturb(mft.load_copy(mft.onnx_file("make_resnetish", dynamo=True)), "layer1.1.bn2")
    candidate = mft.save(model, tmp_path, "resnet.onnx")
    result = run_cli("verify", candidate, "--against", "tests.helpers.models_for_tests:make_resnetish", "--localize")
    assert result.exit_code == 1
    assert ("first divergent module: layer1.1.bn2 (BatchNorm2d) (its ONNX node also computes layer1.1.conv2"
            in " ".join(result.output.split()))


@pytest.mark.parametrize("side", ["candidate", "reference"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_nan_or_inf_on_one_side_fails_even_with_huge_tolerances(tmp_path, side, value):
    good = mft.onnx_file("make_groupnorm")
    bad = mft.save(mft.perturb(mft.load_copy(good), "conv1", value), tmp_path, "bad.onnx")
    candidate, reference = (bad, good) if side == "candidate" else (good, bad)
    result = run_cli("verify", candidate, "--against", reference, "--atol", "1e30", "--rtol", "1e30",
                     "--json", "-")
    assert result.exit_code == 1
    output = json.loads(result.stdout)["outputs"][0]
    assert output[f"nonfinite_{side}"] > 0 and not output["passed"]


def test_torchscript_and_pt2_references(tmp_path):
    module = mft.make_groupnorm()
    example = torch.randn(1, 3, 8, 8)
    scripted, program = tmp_path / "gn.ts", tmp_path / "gn.pt2"
    torch.jit.save(torch.jit.trace(module, example), str(scripted))
    torch.export.save(torch.export.export(module, (example,)), str(program))
    for reference in (scripted, program):
        result = run_cli("verify", mft.onnx_file("make_groupnorm"), "--against", reference, "--localize")
        assert result.exit_code == 0, result.output
        assert "cannot be hooked" in result.output  # says so instead of guessing


def test_npz_inputs_and_weights(tmp_path):
    npz = tmp_path / "inputs.npz"
    np.savez(npz, **mft.feeds_for("make_resnetish"))
    weights = tmp_path / "weights.pt"
    torch.save(mft.make_resnetish().state_dict(), weights)
    result = run_cli("verify", mft.onnx_file("make_resnetish"), "--against", "tests.helpers.models_for_tests:make_resnetish",
                     "--weights", weights, "--inputs", npz)
    assert result.exit_code == 0, result.output
    assert "inputs from inputs.npz" in " ".join(result.output.split())  # the table title may wrap


def test_outputs_matched_by_position_when_names_differ(tmp_path):
    model = mft.load_copy(mft.onnx_file("make_groupnorm"))
    old = model.graph.output[0].name
    for node in model.graph.node:
        node.output[:] = ["renamed" if o == old else o for o in node.output]
    model.graph.output[0].name = "renamed"
    candidate = mft.save(model, tmp_path, "renamed.onnx")
    report = verify(candidate, mft.onnx_file("make_groupnorm"))
    assert report.passed and report.matched_by == "position"
    assert report.outputs[0].reference_name == old


def test_provider_error_outside_the_cli_names_no_option():
    """The runtime layer says what is wrong and to use the cpu provider; only the CLI knows the option's name."""
    from normfold.errors import ProviderUnavailable
    from normfold.runtime.session import make_session

    try:
        make_session(str(mft.onnx_file("make_groupnorm")), provider="cuda")
    except ProviderUnavailable as exc:
        assert "--" not in str(exc) and str(exc).endswith("use the cpu provider")
        assert exc.for_option("--measure-provider").endswith("; use --measure-provider cpu")
    else:
        pytest.skip("a usable CUDA GPU is present")


def test_cuda_provider_without_gpu_is_a_clear_error(tmp_path):
    json_path = tmp_path / "r.json"
    result = run_cli("verify", mft.onnx_file("make_groupnorm"), "--against", mft.onnx_file("make_groupnorm"),
                     "--provider", "cuda", "--json", json_path)
    if result.exit_code == 0:
        pytest.skip("a usable CUDA GPU is present")
    assert result.exit_code == 2
    assert "execution provider 'cuda'" in result.stderr and "--provider cpu" in result.stderr
    assert not json_path.exists()


# ---- the numeric core ------------------------------------------------------------------------


def test_metrics_and_relative_error_floor():
    ref = np.array([0.0, 1e-6, 1.0, 10.0], dtype=np.float32)
    cand = ref + np.array([1e-5, 1e-5, 2e-3, 0.0], dtype=np.float32)
    c = compare_arrays(cand, ref)
    assert (c.atol, c.rtol) == default_tolerance(np.float32) == (1e-4, 1e-3)
    # floor atol/rtol = 0.1: the errors at ~0 are 1e-4 relative, not 10 or infinite
    assert c.max_rel == pytest.approx(2e-3, rel=1e-3)
    assert c.outside == 1 and c.outside_share == 0.25
    assert c.max_abs == pytest.approx(2e-3, rel=1e-3) and c.cosine > 0.9999


def test_default_tolerances_follow_the_least_precise_dtype():
    assert default_tolerance(np.float16, np.float32) == (1e-2, 1e-2)
    assert default_tolerance(np.int64) == (0.0, 0.0)
    assert not compare_arrays(np.array([1, 2]), np.array([1, 3])).passed


def test_match_outputs():
    assert match_outputs(["a", "b"], ["b", "a"]) == ([("a", "a"), ("b", "b")], "name")
    assert match_outputs(["a"], ["z"]) == ([("a", "z")], "position")


def test_generated_inputs_are_deterministic_and_dtype_aware():
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 3])
    ids = onnx.helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, [2, 5])
    mask = onnx.helper.make_tensor_value_info("mask", onnx.TensorProto.BOOL, [2])
    graph = onnx.helper.make_graph([], "g", [x, ids, mask], [])
    specs = input_specs(onnx.helper.make_model(graph))
    a = generate_inputs(specs, {"x": (4, 3)}, seed=7, samples=2)
    b = generate_inputs(specs, {"x": (4, 3)}, seed=7, samples=2)
    assert all(np.array_equal(a[i][k], b[i][k]) for i in range(2) for k in a[0])
    assert not np.array_equal(a[0]["x"], a[1]["x"])
    assert a[0]["x"].shape == (4, 3) and a[0]["x"].dtype == np.float32
    assert a[0]["ids"].dtype == np.int64 and 0 <= a[0]["ids"].min() and a[0]["ids"].max() < 10
    assert a[0]["mask"].dtype == np.bool_


def test_torchscript_scope_names_of_module_paths():
    from normfold.verify.scopes import torchscript_scopes

    scopes = torchscript_scopes(["layer1", "layer1.0", "layer1.0.conv1", "features", "features.0", "features.0.1"])
    assert scopes[("layer1", "layer1.0", "conv1")] == "layer1.0.conv1"
    assert scopes[("features", "features.0", "features.0.1")] == "features.0.1"

"""`normfold.testing.assert_equivalent` used from pytest, both ways."""

from __future__ import annotations

import pytest

import tests.helpers.models_for_tests as mft
from normfold import NormfoldError
from normfold.testing import assert_equivalent


def test_passes_against_a_module():
    assert_equivalent(mft.onnx_file("make_layernorm"), mft.make_layernorm())


def test_passes_with_model_protos_and_given_inputs():
    candidate = mft.load_copy(mft.onnx_file("make_groupnorm"))
    reference = mft.load_copy(mft.onnx_file("make_groupnorm"))
    assert_equivalent(candidate, reference, inputs=mft.feeds_for("make_groupnorm"), atol=1e-6, rtol=1e-6)


def test_passes_against_a_path_and_a_callable_spec():
    assert_equivalent(mft.onnx_file("make_two_in_out"), mft.onnx_file("make_two_in_out"))
    assert_equivalent(str(mft.onnx_file("make_two_in_out")), "tests.helpers.models_for_tests:make_two_in_out")


def test_fails_with_the_report_table_and_the_divergent_layer():
    candidate = mft.perturb(mft.load_copy(mft.onnx_file("make_resnetish")), "/layer1/layer1.0/conv1/")
    with pytest.raises(AssertionError) as info:
        assert_equivalent(candidate, mft.make_resnetish())
    message = str(info.value)
    assert "max abs" in message and "cosine" in message and "FAIL" in message
    assert "first divergent module: layer1.0.conv1" in message


def test_huge_tolerances_pass_a_perturbed_model_but_not_a_nan():
    model = mft.load_copy(mft.onnx_file("make_groupnorm"))
    assert_equivalent(mft.perturb(model, "conv1"), mft.make_groupnorm(), atol=1e6, rtol=1e6)
    with pytest.raises(AssertionError, match="NaN/Inf in candidate"):
        assert_equivalent(mft.perturb(model, "conv1", float("nan")), mft.make_groupnorm(), atol=1e6, rtol=1e6)


def test_bad_input_is_not_an_assertion_error():
    with pytest.raises(NormfoldError, match="forward takes 1"):
        assert_equivalent(mft.onnx_file("make_two_in_out"), mft.make_groupnorm())

"""Assertions for users' own test suites (pytest or unittest).

    from normfold.testing import assert_equivalent

    def test_shipped_model_matches_pytorch():
        assert_equivalent("model.onnx", make_model(), atol=1e-4)
"""

from __future__ import annotations

import os
from typing import Any

import onnx

from normfold.verify.run import Inputs, verify
from normfold.cli.render import report_text


def assert_equivalent(
    candidate: onnx.ModelProto | str | os.PathLike,
    reference: Any,
    inputs: Inputs = None,
    atol: float | None = None,
    rtol: float | None = None,
    **options,
) -> None:
    """Raise AssertionError, with the comparison table as its message, unless
    `candidate` computes what `reference` computes.

    candidate: an ONNX path or ModelProto. reference: an `nn.Module` (put in eval
    mode), a path (.onnx, TorchScript, .pt2), `package.module:callable` or a
    ModelProto. inputs: None (generated), an .npz path, a {name: array} dict or a
    list of them. atol/rtol: None picks per-dtype defaults. Other keyword
    arguments go to `normfold.verify.run.verify` (e.g. shapes, seed, samples,
    weights, provider). On failure the message also names the first divergent
    node or module (pass localize=False to skip that). Bad input raises `NormfoldError`.
    """
    report = verify(candidate, reference, inputs=inputs, atol=atol, rtol=rtol, **options)
    if not report.passed and "localize" not in options:  # say where it starts, at the cost of a rerun
        report = verify(candidate, reference, inputs=inputs, atol=atol, rtol=rtol, localize=True, **options)
    if not report.passed:
        raise AssertionError("\n" + report_text(report))

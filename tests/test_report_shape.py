"""The Python API and the commands run passes through the one runner and the
pass registry, so they report the same things in the same shape."""

from __future__ import annotations

import json

import onnx
import pytest

import normfold
from tests.helpers.graphs import G
from tests.test_cli_fold_bn import run_cli
from tests.test_cli_fuse import norm_model, write


def command_passes(tmp_path, *args) -> list[dict]:
    code, out, err = run_cli(*args, "-o", tmp_path / "out.onnx", "--json", "-")
    assert code == 0, err
    return json.loads(out)["passes"]


def bn_model() -> onnx.ModelProto:
    g = G(opset=17)
    x = g.input([1, 3, 8, 8], name="x")
    y, _ = g.bn(g.conv(x, 3, 4, [3, 3], pads=[1, 1, 1, 1]), 4)
    g.output(g.op("Relu", [y]))
    return g.model()


@pytest.mark.parametrize("target", ["auto", "custom"])
def test_fuse_api_and_command_report_alike(tmp_path, target):
    model, _ = norm_model()
    src = write(tmp_path, model)
    _, report = normfold.fuse(onnx.load(src), target=target)
    passes = command_passes(tmp_path, "fuse", src, "--target", target)
    assert passes[0]["pass"] == report.name == "fuse"
    assert report.to_dict()["changes"] == passes[0]["changes"]
    # the API's single report lists the nodes no function body serves among its skips
    assert report.to_dict()["skips"] == [s for p in passes for s in p["skips"]]
    assert [p["pass"] for p in passes[1:]] in ([], ["portable"])


def test_optimize_api_and_command_give_the_same_reports(tmp_path):
    model, _ = norm_model()
    src = write(tmp_path, model)
    _, reports = normfold.optimize(onnx.load(src))
    passes = command_passes(tmp_path, "optimize", src, "--no-verify", "--no-measure")  # the API does not time
    assert [r.to_dict() for r in reports] == passes
    assert [p["pass"] for p in passes] == ["canonicalize", "fold-wn", "fold-bn", "fuse", "fold-affine", "cleanup", "portable"]


def test_fold_bn_api_and_command_give_the_same_report(tmp_path):
    src = write(tmp_path, bn_model())
    _, report = normfold.fold_bn(onnx.load(src))
    passes = command_passes(tmp_path, "fold-bn", src)
    assert [report.to_dict()] == passes
    assert report.counts() == {"Conv (backward)": 1}

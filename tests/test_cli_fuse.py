"""`normfold fuse` on files: the fused model runs (with the library) and
matches the input model; bad input is exit 2 with one error line and nothing
written; options reach the pass; the report is complete."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from tests.helpers.graphs import BAD_MODEL_FILES, G, file_digests, ort_run, save_with_external_data
from tests.helpers.norm_graphs import affine, custom_nodes, group_norm, layer_norm, normalize, silu
from normfold.runtime.session import make_session
from tests.test_cli_fold_bn import assert_bad_input, run_cli, run_subprocess


def norm_model(opset=17):
    """GroupNorm+SiLU -> channel-first LayerNorm -> RMSNorm over the last axis, and a look-alike
    (a mean square over axis 2 of 4) whose result is a second output."""
    g = G(opset=opset)
    x = g.input([2, 8, 5, 6], name="x")
    y = silu(g, affine(g, group_norm(g, x, 8, 4, 1e-5), g.randn([8, 1, 1]), g.randn([8, 1, 1])))
    y = affine(g, layer_norm(g, y, (1,), 1e-6), g.randn([8, 1, 1]), g.randn([8, 1, 1]), scale_first=True)
    y = affine(g, normalize(g, y, (3,), 1e-6), g.randn([6]))
    odd = normalize(g, x, (2,), 1e-5)
    g.output(y, shape=[2, 8, 5, 6])
    g.output(odd, shape=[2, 8, 5, 6])
    return g.model(), g.feeds


def write(folder, model, name="m.onnx"):
    path = folder / name
    path.write_bytes(model.SerializeToString())
    return path


def run_fused(path, feeds):
    model = onnx.load(str(path))
    return make_session(model).run([o.name for o in model.graph.output], feeds)


def test_fuse_writes_a_model_that_matches(tmp_path):
    model, feeds = norm_model()
    src = write(tmp_path, model)
    before = src.read_bytes()
    code, out, err = run_cli("fuse", src, "--target", "custom")
    assert code == 0, err
    assert src.read_bytes() == before
    dest = tmp_path / "m.fused.onnx"
    fused = onnx.load(str(dest))
    assert sorted(n.op_type for n in custom_nodes(fused)) == ["GroupNorm", "LayerNorm", "RMSNorm"]
    assert len(fused.graph.node) == 3 + 5  # the look-alike stays as it was
    for got, want in zip(run_fused(dest, feeds), ort_run(model, feeds)):
        assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())
    assert "+SiLU)" in out and "left as is" in out


def test_json_report(tmp_path):
    model, _ = norm_model()
    src = write(tmp_path, model)
    code, out, err = run_subprocess("fuse", src, "-o", tmp_path / "o.onnx", "--json", "-", "--target", "custom")
    assert code == 0, err
    report = json.loads(out)
    assert report["ops_before"]["InstanceNormalization"] == 1 and report["ops_after"]["InstanceNormalization"] == 0
    assert report["ops_after"]["GroupNorm"] == 1 and report["ops_after"]["RMSNorm"] == 1
    p, bodies = report["passes"]
    assert p["pass"] == "fuse" and p["changed"] == 3 and p["skipped"] == 1
    assert bodies["pass"] == "portable" and bodies["skipped"] == 0
    assert sorted(c["node"] for c in bodies["changes"]) == ["GroupNorm", "LayerNorm", "RMSNorm"]
    into = sorted(c["into"] for c in p["changes"])
    assert into == ["com.normfold.GroupNorm", "com.normfold.LayerNorm", "com.normfold.RMSNorm"]
    gn = next(c for c in p["changes"] if c["into"] == "com.normfold.GroupNorm")
    assert gn["op"] == "Reshape+InstanceNormalization+Reshape+Mul+Add+Sigmoid+Mul" and "SiLU" in gn["how"]
    assert "axes [2]" in p["skips"][0]["reason"]


def test_ops_and_target_reach_the_pass(tmp_path):
    model, feeds = norm_model(opset=17)
    src = write(tmp_path, model)
    dest = tmp_path / "o.onnx"
    assert run_cli("fuse", src, "-o", dest, "--ops", "ln", "--target", "standard")[0] == 0
    fused = onnx.load(str(dest))
    assert not custom_nodes(fused)
    assert [n.op_type for n in fused.graph.node].count("InstanceNormalization") == 1
    assert run_cli("fuse", src, "-o", dest, "--ops", "gn, rms")[0] == 0
    fused = onnx.load(str(dest))
    assert sorted(n.op_type for n in custom_nodes(fused)) == ["GroupNorm", "RMSNorm"]


@pytest.mark.parametrize("ops", ["bn", "", "gn,xx"])
def test_bad_ops_value(tmp_path, ops):
    model, _ = norm_model()
    src = write(tmp_path, model)
    before = file_digests(tmp_path)
    code, out, err = run_cli("fuse", src, "--ops", ops)
    assert code == 2 and "Traceback" not in err and "--ops" in err
    assert file_digests(tmp_path) == before


@pytest.mark.parametrize("case", list(BAD_MODEL_FILES))
def test_bad_model_file(tmp_path, case):
    path = BAD_MODEL_FILES[case](tmp_path)
    before = file_digests(tmp_path)
    assert_bad_input(*run_cli("fuse", path, "-o", tmp_path / "out.onnx"))
    assert file_digests(tmp_path) == before


def test_bad_model_file_subprocess(tmp_path):
    path = BAD_MODEL_FILES["truncated 50%"](tmp_path)
    before = file_digests(tmp_path)
    assert_bad_input(*run_subprocess("fuse", path))
    assert file_digests(tmp_path) == before


def test_external_data_input(tmp_path):
    model, feeds = norm_model()
    src = tmp_path / "m.onnx"
    save_with_external_data(model, src, "m.onnx.data", threshold=0)
    data_before = (tmp_path / "m.onnx.data").read_bytes()
    dest = tmp_path / "o.onnx"
    assert run_cli("fuse", src, "-o", dest, "--target", "custom")[0] == 0
    assert (tmp_path / "m.onnx.data").read_bytes() == data_before
    want = ort_run(model, feeds)
    got = run_fused(dest, feeds)
    assert np.abs(got[0] - want[0]).max() <= 1e-4 * max(1.0, np.abs(want[0]).max())

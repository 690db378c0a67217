"""`normfold fold-affine` on files: bad input is exit 2 with one `normfold:
error:` line and the input untouched; good input folds, reports as JSON (the
report of every pass), and the command reports what the Python API reports."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest

import normfold
from tests.helpers.graphs import BAD_MODEL_FILES, G, count_op, external_locations, file_digests, max_err, ort_run, \
    save_with_external_data
from tests.test_cli_fold_bn import assert_bad_input, run_cli, run_subprocess


def standardise_conv_scale() -> tuple[onnx.ModelProto, dict]:
    """(x - mean) / std -> Conv(3x3, pads 1) -> gamma * y -> Relu: the
    standardisation folds partially (an Add is left), the layer scale backward."""
    g = G(rng=np.random.default_rng(0))
    x = g.input([1, 3, 6, 6], name="x")
    h = g.op("Sub", [x, g.const(np.reshape([0.485, 0.456, 0.406], (3, 1, 1)))], name="sub_mean")
    h = g.op("Div", [h, g.const(np.reshape([0.229, 0.224, 0.225], (3, 1, 1)))], name="div_std")
    y = g.conv(h, 3, 16, [3, 3], pads=[1, 1, 1, 1], name="conv")
    y = g.op("Mul", [g.const(g.randn([16, 1, 1])), y], name="gamma")
    g.output(g.op("Relu", [y], outputs=["y"]))
    return g.model(), g.feeds


def write(folder, model, name="m.onnx"):
    path = folder / name
    path.write_bytes(model.SerializeToString())
    return path


def assert_matches(model, path, feeds):
    [ref], [got] = ort_run(model, feeds), ort_run(onnx.load(str(path)), feeds)
    assert max_err(got, ref) <= 1e-5 * max(1.0, float(np.abs(ref).max()))


@pytest.mark.parametrize("case", list(BAD_MODEL_FILES))
def test_bad_model_file(tmp_path, case):
    path = BAD_MODEL_FILES[case](tmp_path)
    before = file_digests(tmp_path)
    assert_bad_input(*run_cli("fold-affine", path, "-o", tmp_path / "out.onnx"))
    assert_bad_input(*run_cli("fold-affine", path))
    assert file_digests(tmp_path) == before, "files changed or were written"


@pytest.mark.parametrize("case", ["random bytes", "truncated 50%"])
def test_bad_model_file_subprocess(tmp_path, case):
    path = BAD_MODEL_FILES[case](tmp_path)
    before = file_digests(tmp_path)
    assert_bad_input(*run_subprocess("fold-affine", path))
    assert file_digests(tmp_path) == before


@pytest.mark.parametrize("args", [["--direction", "sideways"], ["-o", "o.onnx", "--inplace"]])
def test_bad_options_are_usage_errors(tmp_path, args):
    src = write(tmp_path, standardise_conv_scale()[0])
    before = file_digests(tmp_path)
    code, out, err = run_cli("fold-affine", src, *[str(tmp_path / a) if a.endswith(".onnx") else a for a in args])
    assert code == 2 and "Traceback" not in err
    assert file_digests(tmp_path) == before


def test_json_to_stdout_and_the_written_model(tmp_path):
    model, feeds = standardise_conv_scale()
    src = write(tmp_path, model)
    before = src.read_bytes()
    dest = tmp_path / "o.onnx"
    code, out, err = run_subprocess("fold-affine", src, "-o", dest, "--json", "-")
    assert code == 0, err
    assert src.read_bytes() == before
    report = json.loads(out)
    assert report["nodes_before"] == 5 and report["nodes_after"] == 3
    assert report["ops_before"] == {"Mul": 1, "Div": 1, "Add": 0, "Sub": 1}
    assert report["ops_after"] == {"Mul": 0, "Div": 0, "Add": 1, "Sub": 0}
    [p] = report["passes"]
    assert p["pass"] == "fold-affine" and p["changed"] == 3 and p["skipped"] == 0
    assert p["by_kind"] == {"Conv (partial)": 2, "Conv (backward)": 1}
    assert {c["node"]: c["how"] for c in p["changes"]} == {"sub_mean": "partial", "div_std": "partial",
                                                            "gamma": "backward"}
    assert [n.op_type for n in onnx.load(str(dest)).graph.node] == ["Add", "Conv", "Relu"]
    assert_matches(model, dest, feeds)


def test_direction_and_quiet_inplace(tmp_path):
    model, feeds = standardise_conv_scale()
    src = write(tmp_path, model)
    code, out, err = run_subprocess("fold-affine", src, "--inplace", "--direction", "forward", "-q")
    assert code == 0 and out == "" and err == "", err
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]
    folded = onnx.load(str(src))
    assert count_op(folded, "Mul") == 1 and count_op(folded, "Div") == 0  # gamma is left: nothing reads it forward
    assert_matches(model, src, feeds)


def test_summary_lists_what_is_left(tmp_path):
    src = write(tmp_path, standardise_conv_scale()[0])
    code, out, err = run_cli("fold-affine", src, "--direction", "backward")
    assert code == 0, err
    assert "sub_mean" in out and "div_std" in out and "graph input" in out


def test_external_data_stays_external(tmp_path):
    model, feeds = standardise_conv_scale()
    src = tmp_path / "m.onnx"
    save_with_external_data(model, src, "m.onnx.data", threshold=256)
    before = file_digests(tmp_path)
    (tmp_path / "out").mkdir()
    dest = tmp_path / "out" / "o.onnx"
    code, out, err = run_cli("fold-affine", src, "-o", dest, "-q")
    assert code == 0, err
    assert {k: v for k, v in file_digests(tmp_path).items() if not k.startswith("out")} == before
    assert external_locations(dest)
    assert_matches(model, dest, feeds)


def test_api_and_command_give_the_same_report(tmp_path):
    model, _ = standardise_conv_scale()
    src = write(tmp_path, model)
    _, report = normfold.fold_affine(onnx.load(str(src)))
    code, out, err = run_cli("fold-affine", src, "-o", tmp_path / "o.onnx", "--json", "-")
    assert code == 0, err
    assert json.loads(out)["passes"] == [report.to_dict()]

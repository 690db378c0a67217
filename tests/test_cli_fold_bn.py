"""`normfold fold-bn` on files: bad input is exit 2 with exactly one
`normfold: error:` line, no traceback, input untouched and nothing written;
good input folds, keeps external data external, and reports as JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from tests.helpers.graphs import (
    BAD_MODEL_FILES,
    conv_bn_model,
    count_op,
    external_locations,
    file_digests,
    max_err,
    ort_run,
    save_with_external_data,
)
from normfold.cli.main import main

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str):
    """In-process run; returns (exit code, stdout, stderr)."""
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"normfold raised {type(result.exception).__name__}: {result.exception}")
    return result.exit_code, result.stdout, result.stderr


def run_subprocess(*args: str, cwd=None):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("NORMFOLD_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "normfold", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


def assert_bad_input(code: int, stdout: str, stderr: str):
    assert code == 2, f"exit code {code}, stderr: {stderr!r}"
    assert "Traceback" not in stderr and "Traceback" not in stdout
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {lines!r}"
    assert lines[0].startswith("normfold: error: "), lines[0]
    assert len(lines[0]) > len("normfold: error: ") + 10


def write_model(folder: Path, name="m.onnx", seed=0):
    model, feeds = conv_bn_model(seed)
    p = folder / name
    p.write_bytes(model.SerializeToString())
    return p, model, feeds


# ------------------------------------------------------------- bad input
@pytest.mark.parametrize("case", list(BAD_MODEL_FILES))
def test_bad_model_file(tmp_path, case):
    path = BAD_MODEL_FILES[case](tmp_path)
    before = file_digests(tmp_path)
    out = tmp_path / "out.onnx"
    assert_bad_input(*run_cli("fold-bn", path, "-o", out))
    assert file_digests(tmp_path) == before, "files changed or were written"
    # the default output path too
    assert_bad_input(*run_cli("fold-bn", path))
    assert file_digests(tmp_path) == before


@pytest.mark.parametrize("case", ["random bytes", "truncated 50%", "external data ../", "IR version too new"])
def test_bad_model_file_subprocess(tmp_path, case):
    """The real process: exit status and stderr as a user sees them."""
    path = BAD_MODEL_FILES[case](tmp_path)
    before = file_digests(tmp_path)
    assert_bad_input(*run_subprocess("fold-bn", path))
    assert file_digests(tmp_path) == before


@pytest.mark.parametrize("kind", ["missing", "folder"])
def test_missing_file_or_folder(tmp_path, kind):
    path = tmp_path / "nope.onnx"
    if kind == "folder":
        path.mkdir()
    code, out, err = run_subprocess("fold-bn", path)
    assert_bad_input(code, out, err)
    assert "nope.onnx" in err
    assert [p.name for p in tmp_path.iterdir()] == ([] if kind == "missing" else ["nope.onnx"])


def _out_missing_folder(d, src):
    return d / "no" / "such" / "out.onnx"


def _out_folder_is_file(d, src):
    (d / "afile").write_text("x")
    return d / "afile" / "out.onnx"


def _out_proc(d, src):
    return Path("/proc/normfold-test-out.onnx")


def _out_is_input(d, src):
    return src


def _out_is_input_dotdot(d, src):
    (d / "sub").mkdir()
    return d / "sub" / ".." / src.name


def _out_is_symlink_to_input(d, src):
    link = d / "link.onnx"
    link.symlink_to(src)
    return link


def _out_is_folder(d, src):
    (d / "outdir").mkdir()
    return d / "outdir"


BAD_OUTPUTS = {
    "output folder missing": _out_missing_folder,
    "output folder is a file": _out_folder_is_file,
    "output in /proc": _out_proc,
    "-o is the input": _out_is_input,
    "-o is the input via ..": _out_is_input_dotdot,
    "-o is a symlink to the input": _out_is_symlink_to_input,
    "-o is a folder": _out_is_folder,
}


@pytest.mark.parametrize("case", list(BAD_OUTPUTS))
def test_bad_output_path(tmp_path, case):
    src, _, _ = write_model(tmp_path)
    out = BAD_OUTPUTS[case](tmp_path, src)
    before = file_digests(tmp_path)
    listing = sorted(p.name for p in tmp_path.rglob("*"))
    assert_bad_input(*run_cli("fold-bn", src, "-o", out))
    assert file_digests(tmp_path) == before
    assert sorted(p.name for p in tmp_path.rglob("*")) == listing, "something was written"
    if case == "output in /proc":
        assert not out.exists()


@pytest.mark.parametrize("case", ["-o is the input", "output folder missing"])
def test_bad_output_path_subprocess(tmp_path, case):
    src, _, _ = write_model(tmp_path)
    out = BAD_OUTPUTS[case](tmp_path, src)
    before = file_digests(tmp_path)
    assert_bad_input(*run_subprocess("fold-bn", src, "-o", out))
    assert file_digests(tmp_path) == before


@pytest.mark.parametrize("target", ["the external data file", "the output's .data = the input's data"])
def test_output_must_not_overwrite_the_inputs_external_data(tmp_path, target):
    model, _ = conv_bn_model()
    src = tmp_path / "m.onnx"
    if target == "the external data file":
        save_with_external_data(model, src, "w.bin")
        out = tmp_path / "w.bin"
    else:
        save_with_external_data(model, src, "out.onnx.data")
        out = tmp_path / "out.onnx"
    before = file_digests(tmp_path)
    assert_bad_input(*run_cli("fold-bn", src, "-o", out))
    assert file_digests(tmp_path) == before


def test_output_and_inplace_together_is_a_usage_error(tmp_path):
    src, _, _ = write_model(tmp_path)
    before = file_digests(tmp_path)
    code, out, err = run_cli("fold-bn", src, "-o", tmp_path / "o.onnx", "--inplace")
    assert code == 2 and "Traceback" not in err
    assert file_digests(tmp_path) == before


@pytest.mark.parametrize("option", [["--direction", "sideways"], ["--standalone", "drop"]])
def test_bad_option_value(tmp_path, option):
    src, _, _ = write_model(tmp_path)
    before = file_digests(tmp_path)
    code, out, err = run_cli("fold-bn", src, *option)
    assert code == 2 and "Traceback" not in err
    assert file_digests(tmp_path) == before


# ------------------------------------------------------------ good input
def test_default_output_next_to_input(tmp_path):
    src, model, feeds = write_model(tmp_path)
    before = src.read_bytes()
    code, out, err = run_cli("fold-bn", src)
    assert code == 0, err
    dest = tmp_path / "m.folded.onnx"
    assert sorted(os.listdir(tmp_path)) == ["m.folded.onnx", "m.onnx"]
    assert src.read_bytes() == before
    folded = onnx.load(str(dest))
    assert count_op(folded, "BatchNormalization") == 0
    [ref], [got] = ort_run(model, feeds), ort_run(folded, feeds)
    assert max_err(got, ref) <= 1e-5 * max(1.0, float(np.abs(ref).max()))


def test_inplace_replaces_atomically(tmp_path):
    src, model, feeds = write_model(tmp_path)
    code, out, err = run_subprocess("fold-bn", src, "--inplace", "-q")
    assert code == 0, err
    assert out == "" and err == ""
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"], "temporary files left behind"
    folded = onnx.load(str(src))
    assert count_op(folded, "BatchNormalization") == 0
    [ref], [got] = ort_run(model, feeds), ort_run(folded, feeds)
    assert max_err(got, ref) <= 1e-5 * max(1.0, float(np.abs(ref).max()))


@pytest.mark.parametrize("location", ["m.onnx.data", "weights/w.bin"])
def test_external_data_model_folds_and_stays_external(tmp_path, location):
    model, feeds = conv_bn_model()
    src_dir = tmp_path / "in"
    (src_dir / "weights").mkdir(parents=True)
    src = src_dir / "m.onnx"
    save_with_external_data(model, src, location)
    before = file_digests(src_dir)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    dest = out_dir / "folded.onnx"
    code, out, err = run_cli("fold-bn", src, "-o", dest)
    assert code == 0, err
    assert file_digests(src_dir) == before
    locs = external_locations(dest)
    assert locs, "the output has no external data"
    for loc in locs:
        assert not os.path.isabs(loc) and ".." not in Path(loc).parts, loc
        assert (out_dir / loc).is_file()
    assert any(n.endswith(".data") for n in os.listdir(out_dir))
    assert not [n for n in os.listdir(out_dir) if n.endswith(".tmp") or n.startswith(".")]
    folded = onnx.load(str(dest))  # loads its external data relative to dest
    assert count_op(folded, "BatchNormalization") == 0
    [ref], [got] = ort_run(model, feeds), ort_run(folded, feeds)
    assert max_err(got, ref) <= 1e-5 * max(1.0, float(np.abs(ref).max()))


def test_external_data_model_inplace(tmp_path):
    model, feeds = conv_bn_model()
    src = tmp_path / "m.onnx"
    save_with_external_data(model, src, "m.onnx.data")
    code, out, err = run_cli("fold-bn", src, "--inplace")
    assert code == 0, err
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp") or n.startswith(".")]
    folded = onnx.load(str(src))
    assert count_op(folded, "BatchNormalization") == 0
    [ref], [got] = ort_run(model, feeds), ort_run(folded, feeds)
    assert max_err(got, ref) <= 1e-5 * max(1.0, float(np.abs(ref).max()))


def test_json_to_stdout(tmp_path):
    src, model, _ = write_model(tmp_path)
    dest = tmp_path / "o.onnx"
    code, out, err = run_subprocess("fold-bn", src, "-o", dest, "--json", "-")
    assert code == 0, err
    report = json.loads(out)  # stdout is exactly one JSON document
    folded = onnx.load(str(dest))
    assert Path(report["input"]).name == "m.onnx" and Path(report["output"]).name == "o.onnx"
    assert report["nodes_before"] == len(model.graph.node) == 3
    assert report["nodes_after"] == len(folded.graph.node) == 2
    assert report["ops_before"] == {"BatchNormalization": 1}
    assert report["ops_after"] == {"BatchNormalization": 0}
    assert report["bytes_before"] == src.stat().st_size
    assert report["bytes_after"] == dest.stat().st_size
    [p] = report["passes"]
    assert {"pass", "changed", "skipped", "by_kind", "skip_reasons", "changes", "skips"} <= set(p)
    assert p["changed"] == 1 and p["skipped"] == 0
    assert p["changes"][0]["node"] == "bn" and p["changes"][0]["into"] == "Conv"
    assert p["changes"][0]["how"] == "backward"


def test_json_to_file_with_a_skip(tmp_path):
    from tests.helpers.graphs import G

    g = G()
    x = g.input([1, 3, 5, 5], name="x")
    h, bn = g.bn(x, 3, name="bn_in")
    g.output(g.conv(h, 3, 2, [3, 3], pads=[1, 1, 1, 1]))
    src = tmp_path / "pad.onnx"
    src.write_bytes(g.model().SerializeToString())
    code, out, err = run_cli("fold-bn", src, "--json", tmp_path / "r.json", "-q")
    assert code == 0, err
    assert out.strip() == ""
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["ops_after"] == {"BatchNormalization": 1}
    [p] = report["passes"]
    assert p["changed"] == 0 and p["skipped"] == 1
    assert p["skips"][0]["node"] == "bn_in" and "pad" in p["skips"][0]["reason"].lower()
    assert sum(p["skip_reasons"].values()) == 1


def test_summary_is_printed(tmp_path):
    src, _, _ = write_model(tmp_path)
    code, out, err = run_cli("fold-bn", src)
    assert code == 0, err
    assert out.strip(), "no summary printed"
    assert "1" in out


def test_options_reach_the_pass(tmp_path):
    from tests.helpers.graphs import G

    g = G()
    x = g.input([1, 3, 4, 4], name="x")
    h, _ = g.bn(x, 3)
    g.output(g.op("Relu", [h]))
    model = g.model()
    src = tmp_path / "s.onnx"
    src.write_bytes(model.SerializeToString())
    code, _, err = run_cli("fold-bn", src, "-o", tmp_path / "keep.onnx")
    assert code == 0, err
    assert count_op(onnx.load(str(tmp_path / "keep.onnx")), "BatchNormalization") == 1
    code, _, err = run_cli("fold-bn", src, "-o", tmp_path / "aff.onnx", "--standalone", "affine")
    assert code == 0, err
    affine = onnx.load(str(tmp_path / "aff.onnx"))
    assert count_op(affine, "BatchNormalization") == 0
    [ref], [got] = ort_run(model, g.feeds), ort_run(affine, g.feeds)
    assert max_err(got, ref) <= 1e-5 * max(1.0, float(np.abs(ref).max()))
    src2, _, _ = write_model(tmp_path, "c.onnx")
    code, _, err = run_cli("fold-bn", src2, "-o", tmp_path / "fw.onnx", "--direction", "forward")
    assert code == 0, err
    assert count_op(onnx.load(str(tmp_path / "fw.onnx")), "BatchNormalization") == 1


# ------------------------------------------------------------ help/version
def _commands():
    return sorted(main.commands)


def test_every_help_has_an_example():
    code, out, err = run_cli("--help")
    assert code == 0 and "Example" in out
    assert "fold-bn" in out
    for name in _commands():
        code, out, err = run_cli(name, "--help")
        assert code == 0, (name, err)
        assert "Example" in out, f"`normfold {name} --help` has no example"


def test_version():
    from importlib.metadata import version

    import normfold

    code, out, err = run_subprocess("--version")
    assert code == 0
    assert normfold.__version__ in out
    assert version("normfold") == normfold.__version__


@pytest.mark.parametrize("external", [False, True])
def test_large_shared_weight_through_the_cli(tmp_path, external):
    """A weight over normfold's 'large tensor' size shared by two convs, only
    one followed by BN: the file-level path (weights loaded lazily, written one
    at a time) must fold into a copy and keep the other conv exact."""
    from tests.helpers.graphs import G

    g = G(rng=np.random.default_rng(3))
    w = g.const(g.randn([16, 8, 3, 3]))  # 1152 elements
    x1, x2 = g.input([1, 8, 5, 5], name="x1"), g.input([1, 8, 5, 5], name="x2")
    out1, _ = g.bn(g.conv(x1, 8, 16, [3, 3], weight=w, pads=[1, 1, 1, 1]), 16)
    out2 = g.conv(x2, 8, 16, [3, 3], weight=w, pads=[1, 1, 1, 1])
    g.output(out1)
    g.output(out2)
    model = g.model()
    src = tmp_path / "shared.onnx"
    if external:
        save_with_external_data(model, src, "shared.onnx.data")
    else:
        src.write_bytes(model.SerializeToString())
    code, _, err = run_cli("fold-bn", src, "-o", tmp_path / "out.onnx")
    assert code == 0, err
    folded = onnx.load(str(tmp_path / "out.onnx"))
    assert count_op(folded, "BatchNormalization") == 0
    refs, gots = ort_run(model, g.feeds), ort_run(folded, g.feeds)
    for ref, got in zip(refs, gots):
        assert max_err(got, ref) <= 1e-5 * max(1.0, float(np.abs(ref).max()))
    np.testing.assert_array_equal(gots[1], refs[1])

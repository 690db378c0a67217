"""normfold.io.model_io: loading refuses bad files with one clear line (and reads
nothing outside the model's folder); saving is atomic, never overwrites the
input, and keeps external data relative."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from tests.helpers.graphs import (
    BAD_MODEL_FILES,
    conv_bn_model,
    external_locations,
    file_digests,
    ort_run,
    record_opens,
    save_with_external_data,
)
from normfold.errors import NormfoldError
from normfold.io.model_io import load_model, save_model


def weights(model: onnx.ModelProto) -> dict:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def assert_one_line(exc: BaseException):
    msg = str(exc)
    assert msg.strip(), "empty error message"
    assert "\n" not in msg.strip(), f"error message spans several lines: {msg!r}"
    assert "Traceback" not in msg


# ---------------------------------------------------------------- loading
def test_load_plain_model_round_trips(tmp_path):
    model, feeds = conv_bn_model()
    p = tmp_path / "m.onnx"
    p.write_bytes(model.SerializeToString())
    loaded = load_model(p)
    assert not loaded.had_external_data
    assert loaded.file_bytes == p.stat().st_size
    got = weights(loaded.model)
    for name, arr in weights(model).items():
        np.testing.assert_array_equal(got[name], arr)
    np.testing.assert_array_equal(ort_run(loaded.model, feeds)[0], ort_run(model, feeds)[0])


@pytest.mark.parametrize("location", ["m.onnx.data", "weights/w.bin"])
def test_load_external_data_inside_folder(tmp_path, location):
    model, feeds = conv_bn_model()
    p = tmp_path / "m.onnx"
    (tmp_path / "weights").mkdir()
    save_with_external_data(model, p, location)
    assert external_locations(p), "test set-up: nothing was stored externally"
    loaded = load_model(p)
    assert loaded.had_external_data
    assert loaded.file_bytes == p.stat().st_size + (tmp_path / location).stat().st_size
    got = weights(loaded.model)
    for name, arr in weights(model).items():
        np.testing.assert_array_equal(got[name], arr)


@pytest.mark.parametrize("case", list(BAD_MODEL_FILES))
def test_load_refuses_bad_file(tmp_path, case):
    path = BAD_MODEL_FILES[case](tmp_path)
    before = file_digests(tmp_path)
    with pytest.raises(NormfoldError) as info:
        load_model(path)
    assert_one_line(info.value)
    assert str(path.name) in str(info.value), "the message should name the file"
    assert file_digests(tmp_path) == before


@pytest.mark.parametrize("case", [c for c in BAD_MODEL_FILES if c.startswith("external data")])
def test_external_data_outside_folder_is_never_opened(tmp_path, case):
    path = BAD_MODEL_FILES[case](tmp_path)
    model_dir = path.parent.resolve()
    with record_opens() as opened:
        with pytest.raises(NormfoldError) as info:
            load_model(path)
    assert str(path.resolve()) in opened.paths, "test set-up: the audit hook saw no open of the model itself"
    outside = [p for p in opened.paths if not p.startswith(str(model_dir) + os.sep) and p.startswith(str(tmp_path))]
    assert not outside, f"opened files outside the model folder: {outside}"
    assert "outside" in str(info.value).lower() or "absolute" in str(info.value).lower(), str(info.value)


@pytest.mark.parametrize("kind", ["missing", "folder"])
def test_load_missing_or_folder(tmp_path, kind):
    path = tmp_path / "nope.onnx"
    if kind == "folder":
        path.mkdir()
    with pytest.raises(NormfoldError) as info:
        load_model(path)
    assert_one_line(info.value)


# ----------------------------------------------------------------- saving
def test_save_is_atomic_and_leaves_no_temp_files(tmp_path):
    model, feeds = conv_bn_model()
    out = tmp_path / "out.onnx"
    written = save_model(model, out)
    assert sorted(os.listdir(tmp_path)) == ["out.onnx"]
    assert written == out.stat().st_size
    np.testing.assert_array_equal(ort_run(onnx.load(str(out)), feeds)[0], ort_run(model, feeds)[0])


def test_save_over_existing_file_replaces_it_whole(tmp_path):
    model, feeds = conv_bn_model()
    out = tmp_path / "out.onnx"
    out.write_bytes(b"x" * 10_000_000)  # longer than the model: a non-truncating write would leave a tail
    save_model(model, out)
    assert out.stat().st_size < 10_000_000
    np.testing.assert_array_equal(ort_run(onnx.load(str(out)), feeds)[0], ort_run(model, feeds)[0])
    assert sorted(os.listdir(tmp_path)) == ["out.onnx"]


def test_save_refuses_to_overwrite_source(tmp_path):
    model, _ = conv_bn_model()
    src = tmp_path / "m.onnx"
    src.write_bytes(model.SerializeToString())
    before = file_digests(tmp_path)
    for out in (src, tmp_path / "sub" / ".." / "m.onnx"):
        (tmp_path / "sub").mkdir(exist_ok=True)
        with pytest.raises(NormfoldError) as info:
            save_model(model, out, source=src)
        assert_one_line(info.value)
    (tmp_path / "sub").rmdir()
    assert file_digests(tmp_path) == before
    save_model(model, src, source=src, inplace=True)
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]


def test_save_invalid_model_writes_nothing(tmp_path):
    model, _ = conv_bn_model()
    model.graph.node[0].input[0] = "nowhere"
    out = tmp_path / "out.onnx"
    with pytest.raises(Exception):
        save_model(model, out)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("bad", ["missing folder", "folder is a file", "/proc"])
def test_save_to_unwritable_place(tmp_path, bad):
    model, _ = conv_bn_model()
    if bad == "missing folder":
        out = tmp_path / "no" / "such" / "out.onnx"
    elif bad == "folder is a file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "out.onnx"
    else:
        out = Path("/proc/normfold-test-out.onnx")
    with pytest.raises(NormfoldError) as info:
        save_model(model, out)
    assert_one_line(info.value)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] in ([], ["file"])


def test_save_external_data_is_relative_and_loads(tmp_path):
    model, feeds = conv_bn_model()
    out = tmp_path / "out.onnx"
    save_model(model, out, external_data=True)
    locs = external_locations(out)
    assert locs and all(not os.path.isabs(loc) and ".." not in Path(loc).parts for loc in locs)
    assert {(tmp_path / loc).resolve().parent for loc in locs} == {tmp_path.resolve()}
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp") or n.startswith(".")]
    # the in-memory model is left as it was
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    reloaded = load_model(out)
    assert reloaded.had_external_data
    np.testing.assert_array_equal(ort_run(reloaded.model, feeds)[0], ort_run(model, feeds)[0])

"""Hostile model files against every command that reads a model: truncated,
bit-flipped and random bytes (hypothesis), and a fixed corpus of structural
faults (dangling inputs, cycles, duplicate outputs, initializers whose data
does not fit their dims, external data escaping the model's folder, missing
external files). Every case must end with exit 2 and one `normfold: error:`
line, within a time limit, with every input file unchanged."""

from __future__ import annotations

import signal
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from tests.helpers.graphs import BAD_MODEL_FILES, G, conv_bn_model, file_digests, save_with_external_data
from normfold.cli.main import main
from normfold.errors import NormfoldError
from normfold.io.checks import StructureError, check_tensor_data
from normfold.io.model_io import load_model
from tests.test_cli_fold_bn import assert_bad_input, run_cli
from tests.test_cli_fuse import norm_model

SECONDS_PER_COMMAND = 60

# command -> arguments after the model path; the output (if any) goes to OUT.
COMMAND_ARGS = {
    "fold-bn": ["-o", "{out}"],
    "fold-affine": ["-o", "{out}"],
    "fuse": ["-o", "{out}"],
    "fold-wn": ["-o", "{out}"],
    "optimize": ["-o", "{out}"],
    "recalibrate": ["--data", "{calib}", "-o", "{out}"],
    "verify": ["--against", "{model}"],
    "bench": ["--warmup", "0", "--runs", "1"],
    "inspect": [],
}
COMMANDS = [name for name in COMMAND_ARGS if name in main.commands]


# commands that read no model file
NO_MODEL = {"demo", "doctor", "export"}


class Hang(BaseException):
    """A command ran past its time limit (a BaseException, so the CLI's own handler cannot swallow it)."""


@contextmanager
def time_limit(seconds: int):
    """Fail (instead of hanging) when the body runs longer than `seconds`."""

    def expire(signum, frame):
        raise Hang(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def run_everywhere(path: Path, folder: Path, must_refuse: bool = True, calib: dict | None = None) -> None:
    """Run every command on `path`, each within the time limit. None may crash;
    each refusal is exit 2 with one error line and writes nothing; input files
    never change. With `must_refuse`, every command must refuse; otherwise exit 1
    (a failed check, one error line, nothing written) is allowed too. `calib`:
    the inputs recalibrate reads (default: conv_bn_model's)."""
    np.savez(folder / "calib.npz", **(calib or conv_bn_model()[1]))  # data for recalibrate
    before = file_digests(folder)
    out = folder / "out.onnx"
    for command in COMMANDS:
        args = [a.format(out=out, model=path, calib=folder / "calib.npz") for a in COMMAND_ARGS[command]]
        with time_limit(SECONDS_PER_COMMAND):
            code, stdout, stderr = run_cli(command, path, *args)
        assert "internal error" not in stderr and "Traceback" not in stderr + stdout, f"{command}: {stderr}"
        after = file_digests(folder)
        if must_refuse or code != 0:
            # exit 1 (a failed check, e.g. a flipped weight bit made NaN) only for a model load_model accepts
            assert code == 2 or (code == 1 and not must_refuse), f"{command}: exit {code}, stderr {stderr!r}"
            assert_bad_input(2, stdout, as_shown(stderr))
            assert after == before, f"{command} changed or wrote files"
        else:
            assert {name: after.get(name) for name in before} == before, f"{command} changed its input files"
            for written in set(after) - set(before):
                (folder / written).unlink()


def as_shown(text: str) -> str:
    """`text` as a terminal shows it: of each line, what follows its last carriage
    return (progress bars redraw themselves with \\r)."""
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.split("\n"))


def write(folder: Path, model: onnx.ModelProto, name: str = "m.onnx") -> Path:
    path = folder / name
    path.write_bytes(model.SerializeToString())
    return path


def test_every_command_reading_a_model_is_covered():
    assert {"fold-bn", "fuse", "verify", "bench"} <= set(COMMANDS)
    assert set(main.commands) - NO_MODEL == set(COMMANDS), "add the new command to COMMAND_ARGS"


# ------------------------------------------------------------- structural corpus
def _dangling_input(d):
    m = conv_bn_model()[0]
    m.graph.node[1].input[0] = "produced_by_nobody"
    return write(d, m)


def _control_characters_in_names(d):
    """A dangling input whose name holds a newline, and a long node name (found by the fuzz)."""
    m = conv_bn_model()[0]
    m.graph.node[1].input[0] = "two\nlines\x1b[31m"
    m.graph.node[1].name = "n" * 500
    return write(d, m)


def _bad_tensor_with_non_utf8_name(d):
    """Raw data too short on a tensor whose name is not UTF-8 (the size check runs while parsing, first)."""
    m = conv_bn_model()[0]
    weight = max(m.graph.initializer, key=lambda t: len(t.raw_data))
    weight.raw_data = weight.raw_data[:-4]
    weight.name = "w\u00e9ight"
    data = m.SerializeToString().replace("w\u00e9ight".encode(), b"w\xe9!ight")  # same length, not UTF-8
    path = d / "m.onnx"
    path.write_bytes(data)
    return path


def _dangling_graph_output(d):
    m = conv_bn_model()[0]
    m.graph.output[0].name = "never_computed"
    return write(d, m)


def _no_outputs(d):
    m = conv_bn_model()[0]
    del m.graph.output[:]
    return write(d, m)


def _cycle(d):
    """Two Relu nodes reading each other's output."""
    g = G()
    x = g.input([1, 4], name="x")
    g.op("Relu", ["b"], outputs=["a"])
    g.op("Add", [x, "a"], outputs=["b"])
    g.output("b", shape=[1, 4])
    return write(d, _unchecked(g))


def _self_loop(d):
    g = G()
    x = g.input([1, 4], name="x")
    g.op("Add", [x, "y"], outputs=["y"])
    g.output("y", shape=[1, 4])
    return write(d, _unchecked(g))


def _out_of_order(d):
    """Acyclic, but the Relu comes before the Conv whose output it reads."""
    m = conv_bn_model()[0]
    nodes = list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend(nodes[::-1])
    return write(d, m)


def _duplicate_output(d):
    m = conv_bn_model()[0]
    m.graph.node[1].output[0] = m.graph.node[0].output[0]
    return write(d, m)


def _output_shadows_input(d):
    m = conv_bn_model()[0]
    m.graph.node[0].output[0] = "x"
    return write(d, m)


def _output_shadows_initializer(d):
    m = conv_bn_model()[0]
    m.graph.node[0].output[0] = m.graph.initializer[0].name
    return write(d, m)


def _raw_data_short(d):
    m = conv_bn_model()[0]
    weight = max(m.graph.initializer, key=lambda t: len(t.raw_data))
    weight.raw_data = weight.raw_data[:-4]
    return write(d, m)


def _raw_data_long(d):
    m = conv_bn_model()[0]
    bias = min(m.graph.initializer, key=lambda t: len(t.raw_data))
    bias.raw_data = bias.raw_data + b"\0" * 8
    return write(d, m)


def _huge_dims(d):
    """Dims claiming 2**40 elements over 16 bytes of data."""
    m = conv_bn_model()[0]
    weight = max(m.graph.initializer, key=lambda t: len(t.raw_data))
    weight.dims[:] = [2**20, 2**20]
    return write(d, m)


def _negative_dim(d):
    m = conv_bn_model()[0]
    m.graph.initializer[0].dims[0] = -3
    return write(d, m)


def _initializer_type(data_type):
    def build(d):
        m = conv_bn_model()[0]
        m.graph.initializer[0].data_type = data_type
        return write(d, m)

    return build


def _input_without_type(d):
    m = conv_bn_model()[0]
    m.graph.input[0].type.tensor_type.elem_type = 0
    return write(d, m)


def _float_data_count(d):
    m = conv_bn_model()[0]
    t = m.graph.initializer[-1]
    values = onnx.numpy_helper.to_array(t).ravel().tolist()
    t.ClearField("raw_data")
    t.float_data.extend(values[:-1])
    return write(d, m)


def _cycle_in_subgraph(d):
    """An If whose then-branch holds a two-node cycle."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    cond = helper.make_tensor_value_info("c", TensorProto.BOOL, [])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    loop = helper.make_graph([helper.make_node("Add", ["x", "q"], ["p"]), helper.make_node("Relu", ["p"], ["q"])],
                             "then", [], [helper.make_tensor_value_info("q", TensorProto.FLOAT, [2])])
    plain = helper.make_graph([helper.make_node("Relu", ["x"], ["r"])], "else", [],
                              [helper.make_tensor_value_info("r", TensorProto.FLOAT, [2])])
    node = helper.make_node("If", ["c"], ["y"], then_branch=loop, else_branch=plain)
    graph = helper.make_graph([node], "main", [x, cond], [y])
    return write(d, helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10))


def _external_saved(folder: Path) -> Path:
    """conv_bn_model saved in `folder` with its weights in m.onnx.data."""
    p = folder / "m.onnx"
    save_with_external_data(conv_bn_model()[0], p, "m.onnx.data")
    return p


def _edit_external(path: Path, key: str, edit) -> None:
    """Rewrite the external-data field `key` of every tensor of the model at `path` to `edit(value)`."""
    m = onnx.load_model(str(path), load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == key:
                e.value = edit(e.value)
    path.write_bytes(m.SerializeToString())


def _external_symlink_escape(d):
    """The external-data file is a symlink in the model's folder pointing outside it."""
    (d / "model").mkdir()
    p = _external_saved(d / "model")
    (d / "model" / "m.onnx.data").rename(d / "outside.data")
    (d / "model" / "m.onnx.data").symlink_to(d / "outside.data")
    return p


def _external_folder_symlink_escape(d):
    """The location goes through a symlinked folder that points outside."""
    (d / "model").mkdir()
    (d / "elsewhere").mkdir()
    p = _external_saved(d / "model")
    (d / "model" / "m.onnx.data").rename(d / "elsewhere" / "m.onnx.data")
    (d / "model" / "link").symlink_to(d / "elsewhere")
    _edit_external(p, "location", lambda value: "link/m.onnx.data")
    return p


def _external_length_mismatch(d):
    """The external slice is shorter than the tensor's dims need."""
    p = _external_saved(d)
    _edit_external(p, "length", lambda value: str(int(value) - 4))
    return p


def _external_is_folder(d):
    p = _external_saved(d)
    (d / "m.onnx.data").unlink()
    (d / "m.onnx.data").mkdir()
    return p


def _external_bad_offset(d):
    p = _external_saved(d)
    _edit_external(p, "offset", lambda value: "-8")
    return p


def _unchecked(g: G) -> onnx.ModelProto:
    """g's model without the checker (which refuses these graphs)."""
    return helper.make_model(g.graph(), opset_imports=[helper.make_opsetid("", g.opset)], ir_version=10)


STRUCTURAL = {
    "dangling input": _dangling_input,
    "control characters in names": _control_characters_in_names,
    "dangling graph output": _dangling_graph_output,
    "bad tensor with a non-UTF-8 name": _bad_tensor_with_non_utf8_name,
    "no graph outputs": _no_outputs,
    "cycle": _cycle,
    "self loop": _self_loop,
    "nodes out of order": _out_of_order,
    "duplicate node output": _duplicate_output,
    "output shadows a graph input": _output_shadows_input,
    "output shadows an initializer": _output_shadows_initializer,
    "raw data too short": _raw_data_short,
    "raw data too long": _raw_data_long,
    "dims far larger than data": _huge_dims,
    "negative dim": _negative_dim,
    "float_data count": _float_data_count,
    "initializer type undefined": _initializer_type(0),
    "initializer type unknown": _initializer_type(99),
    "input type undefined": _input_without_type,
    "cycle in subgraph": _cycle_in_subgraph,
    "external data symlink escapes": _external_symlink_escape,
    "external data through symlinked folder": _external_folder_symlink_escape,
    "external length too short": _external_length_mismatch,
    "external data is a folder": _external_is_folder,
    "external negative offset": _external_bad_offset,
}
CORPUS = {**STRUCTURAL, **BAD_MODEL_FILES}


@pytest.mark.parametrize("case", list(CORPUS))
def test_corpus_is_refused_by_every_command(tmp_path, case):
    path = CORPUS[case](tmp_path)
    run_everywhere(path, tmp_path)


@pytest.mark.parametrize("case, words", [
    ("dangling input", ["produced_by_nobody", "no node produces"]),
    ("dangling graph output", ["never_computed"]),
    ("bad tensor with a non-UTF-8 name", ["'w\\xe9!ight'", "bytes of data"]),
    ("control characters in names", ["'two\\nlines\\x1b[31m'", "'" + "n" * 80 + "...'"]),
    ("no graph outputs", ["has no outputs"]),
    ("cycle", ["cycle"]),
    ("self loop", ["cycle"]),
    ("nodes out of order", ["not in topological order", "'bn' (BatchNormalization) produces it"]),
    ("cycle in subgraph", ["cycle", "then"]),
    ("duplicate node output", ["more than once"]),
    ("output shadows a graph input", ["'x'", "more than once"]),
    ("raw data too short", ["bytes"]),
    ("dims far larger than data", ["bytes"]),
    ("negative dim", ["negative"]),
    ("float_data count", ["values"]),
    ("initializer type undefined", ["no known element type"]),
    ("initializer type unknown", ["data_type 99"]),
    ("external data symlink escapes", ["outside the model's folder"]),
    ("external data through symlinked folder", ["outside the model's folder"]),
    ("external length too short", ["bytes"]),
])
def test_structural_errors_say_what_is_wrong(tmp_path, case, words):
    path = STRUCTURAL[case](tmp_path)
    with pytest.raises(NormfoldError) as info:
        load_model(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(path))
    for word in words:
        assert word in message, message


def _conv_bias_is_the_weight(d):
    """Parses and passes onnx.checker (found by the bit-flip fuzz): the Conv's bias input names its 4-D weight."""
    m = conv_bn_model()[0]
    conv = m.graph.node[0]
    conv.input[2] = conv.input[1]
    return write(d, m)


def test_conv_bias_of_wrong_shape(tmp_path):
    """fold-bn and fuse leave the BN with a reason (exit 0); what runs the model refuses it."""
    run_everywhere(_conv_bias_is_the_weight(tmp_path), tmp_path, must_refuse=False)


def test_valid_models_still_load(tmp_path):
    """The checks refuse nothing valid: a model with a subgraph reading an outer
    name, optional (empty) inputs, and external data."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    cond = helper.make_tensor_value_info("c", TensorProto.BOOL, [])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    outer = helper.make_graph([helper.make_node("Relu", ["r"], ["t"])], "then", [],
                              [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2])])
    other = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2])])
    nodes = [helper.make_node("Clip", ["x", "", "hi"], ["r"]),
             helper.make_node("If", ["c"], ["y"], then_branch=outer, else_branch=other)]
    hi = onnx.numpy_helper.from_array(np.array(1.0, np.float32), "hi")
    graph = helper.make_graph(nodes, "main", [x, cond], [y], [hi])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    loaded = load_model(write(tmp_path, model)).model
    assert loaded.SerializeToString() == model.SerializeToString()
    (tmp_path / "external").mkdir()
    assert load_model(_external_saved(tmp_path / "external")).had_external_data


@given(st.sampled_from([np.float32, np.float16, np.int64, np.int8, np.bool_, np.float64, np.complex64]),
       st.lists(st.integers(0, 5), max_size=3), st.integers(-9, 9))
def test_tensor_data_size_check_agrees_with_numpy(dtype, shape, extra):
    """Tensors made by onnx from a numpy array pass, as raw bytes and as typed
    values; `extra` bytes or values more or less fail."""
    array = np.zeros(shape, dtype)
    raw = onnx.numpy_helper.from_array(array, "t")
    typed = helper.make_tensor("t", raw.data_type, shape, array.ravel().tolist())
    check_tensor_data(raw)
    check_tensor_data(typed)
    values = getattr(typed, helper.tensor_dtype_to_field(raw.data_type))
    if extra == 0 or len(values) + extra < 0:
        return
    raw.raw_data = b"\0" * (array.nbytes + extra)
    with pytest.raises(StructureError, match=f"has {array.nbytes + extra} bytes of data"):
        check_tensor_data(raw)
    if extra > 0:
        values.extend([0] * extra)
    else:
        del values[extra:]
    with pytest.raises(StructureError, match=f"holds {len(values)} values"):
        check_tensor_data(typed)


# ------------------------------------------------------------- byte-level fuzzing
# models to mutate: Conv+BN (fold-bn, recalibrate) and norm subgraphs (fuse), with inputs for recalibrate
SEEDS = {"conv-bn": conv_bn_model(), "norms": norm_model()}
# a quarter of the profile's examples (25 by default; HYPOTHESIS_PROFILE=normfold-stress: 250)
FUZZ = settings(max_examples=max(2, settings.default.max_examples // 4), deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def _fuzz_case(tmp_path_factory, data: bytes, calib: dict | None = None) -> None:
    """A file load_model refuses is refused by every command; one it accepts (a
    flipped bit in a weight, a changed name) runs or is refused, never crashes."""
    folder = tmp_path_factory.mktemp("fuzz")
    path = folder / "m.onnx"
    path.write_bytes(data)
    try:
        load_model(path)
    except NormfoldError:
        run_everywhere(path, folder)
    else:
        run_everywhere(path, folder, must_refuse=False, calib=calib)


@FUZZ
@given(st.sampled_from(list(SEEDS)), st.data())
def test_truncated_model(tmp_path_factory, seed, data):
    model, feeds = SEEDS[seed]
    serialized = model.SerializeToString()
    _fuzz_case(tmp_path_factory, serialized[:data.draw(st.integers(0, len(serialized) - 1), "cut")], feeds)


@FUZZ
@given(st.sampled_from(list(SEEDS)), st.data())
def test_bit_flipped_model(tmp_path_factory, seed, data):
    model, feeds = SEEDS[seed]
    serialized = bytearray(model.SerializeToString())
    for bit in data.draw(st.lists(st.integers(0, len(serialized) * 8 - 1), min_size=1, max_size=4), "bits"):
        serialized[bit // 8] ^= 1 << (bit % 8)
    _fuzz_case(tmp_path_factory, bytes(serialized), feeds)


@FUZZ
@given(st.binary(min_size=0, max_size=2048))
def test_random_bytes(tmp_path_factory, data):
    _fuzz_case(tmp_path_factory, data)



def _onnxruntime_refuses(d):
    """Loads and passes the checks, but onnxruntime has no kernel for its op."""
    node = helper.make_node("Frobnicate", ["x"], ["y"], domain="com.example")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    return write(d, helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                             helper.make_opsetid("com.example", 1)], ir_version=8))


def test_model_onnxruntime_refuses_is_one_line_in_a_real_process(tmp_path):
    """onnxruntime's own log lines must not reach stderr (a subprocess, unlike
    CliRunner, sees what the C++ side writes)."""
    import subprocess
    import sys

    path = _onnxruntime_refuses(tmp_path)
    for args in (["verify", str(path), "--against", str(path)], ["bench", str(path), "--runs", "1"]):
        done = subprocess.run([sys.executable, "-m", "normfold", *args], capture_output=True, text=True,
                              timeout=120)
        assert_bad_input(done.returncode, done.stdout, done.stderr)
        assert "onnxruntime cannot load the model" in done.stderr


def test_empty_list_attribute_survives_every_rewrite(tmp_path):
    """ReduceMean with axes=[] (valid at opset 17: reduce over all axes) once crashed the export."""
    reduce = helper.make_node("ReduceMean", ["x"], ["m"])
    reduce.attribute.append(onnx.AttributeProto(name="axes", type=onnx.AttributeProto.INTS))
    graph = helper.make_graph([reduce, helper.make_node("Identity", ["m"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])])
    path = write(tmp_path, helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
    for command in ("fold-bn", "fuse", "fold-wn", "optimize"):
        out = tmp_path / f"{command}.onnx"
        code, _, err = run_cli(command, path, "-o", out, "-q")
        assert code == 0, (command, err)
        [node] = [n for n in onnx.load(out).graph.node if n.op_type == "ReduceMean"]
        assert [(a.name, a.type, list(a.ints)) for a in node.attribute] == [("axes", onnx.AttributeProto.INTS, [])]

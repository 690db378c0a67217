"""`normfold bench` and `normfold.tools.bench.measure`: statistics against numpy and
`statistics`, the interleaved run order and per-model times under a fake
clock, inputs reaching the sessions (generated, --samples, --inputs), the
JSON report, and bad input (exit 2, one line)."""

from __future__ import annotations

import json
import statistics

import numpy as np
import onnx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import normfold.tools.bench as bench_module
from tests.helpers.graphs import IR_VERSION
from normfold.tools.bench import LatencyStats, measure
from normfold.errors import NormfoldError
from normfold.io.inputs import generate_inputs, input_specs
from tests.test_cli_fold_bn import assert_bad_input, run_cli


def tiny_model(input_name: str = "x", batch: int | str = "N", channels: int = 3) -> onnx.ModelProto:
    """y = Relu(x) * 2 with a dynamic (or fixed) batch dimension."""
    two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    nodes = [helper.make_node("Relu", [input_name], ["r"]), helper.make_node("Mul", ["r", "two"], ["y"])]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info(input_name, TensorProto.FLOAT,
                                                                            [batch, channels])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, channels])], [two])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR_VERSION)


def save(folder, model, name="m.onnx"):
    path = folder / name
    path.write_bytes(model.SerializeToString())
    return path


class FakeRuns:
    """Replaces run_session and the clock: each run of model `name` takes
    `durations[name]` seconds of fake time; the run order and feeds are recorded."""

    def __init__(self, monkeypatch, durations: dict[str, float]):
        self.now = 0.0
        self.durations = durations
        self.order: list[str] = []
        self.feeds: list[dict] = []
        monkeypatch.setattr(bench_module, "clock", lambda: self.now)
        monkeypatch.setattr(bench_module, "run_session", self.run)

    def run(self, session, feeds, what):
        self.order.append(what)
        self.feeds.append(feeds)
        self.now += self.durations[what]


# ------------------------------------------------------------- statistics
@given(st.lists(st.floats(min_value=1e-6, max_value=10.0), min_size=1, max_size=60), st.integers(1, 64))
def test_stats_match_independent_reference(seconds, batch):
    stats = LatencyStats.from_times("m", seconds, batch)
    ms = [s * 1e3 for s in seconds]
    assert stats.runs == len(seconds)
    assert stats.p50 == pytest.approx(statistics.median(ms), rel=1e-12)
    assert stats.min == pytest.approx(min(ms), rel=1e-12)
    assert stats.mean == pytest.approx(statistics.fmean(ms), rel=1e-9)
    assert min(ms) <= stats.p50 <= stats.p90 <= max(ms) * (1 + 1e-12)
    assert stats.throughput == pytest.approx(batch / (statistics.median(seconds)), rel=1e-9)


def test_p90_of_known_times():
    stats = LatencyStats.from_times("m", [i / 1e3 for i in range(10, 0, -1)], 1)  # 10 ms .. 1 ms, unsorted
    assert (stats.p50, stats.p90, stats.min, stats.mean) == pytest.approx((5.5, 9.1, 1.0, 5.5))


# ------------------------------------------------------------- interleaving
def test_runs_are_interleaved_and_timed_per_model(tmp_path, monkeypatch):
    a, b = save(tmp_path, tiny_model(), "a.onnx"), save(tmp_path, tiny_model(), "b.onnx")
    fake = FakeRuns(monkeypatch, {str(a): 0.002, str(b): 0.005})
    stats = measure([a, b], warmup=3, runs=7, shapes=["x=4x3"])
    assert fake.order == [str(a), str(b)] * 10
    assert [s.runs for s in stats] == [7, 7]
    assert [s.p50 for s in stats] == pytest.approx([2.0, 5.0])
    assert [s.min for s in stats] == pytest.approx([2.0, 5.0])
    assert [s.batch for s in stats] == [4, 4]
    assert stats[0].throughput == pytest.approx(4 / 0.002)
    # every model ran on the same arrays in each round
    for first, second in zip(fake.feeds[::2], fake.feeds[1::2]):
        assert first is second


def test_samples_are_cycled_over_rounds(tmp_path, monkeypatch):
    path = save(tmp_path, tiny_model(batch=2))
    fake = FakeRuns(monkeypatch, {str(path): 0.001})
    code, out, err = run_cli("bench", path, "--samples", "3", "--seed", "5", "--warmup", "1", "--runs", "4", "-q")
    assert code == 0, err
    expected = generate_inputs(input_specs(tiny_model(batch=2)), seed=5, samples=3)
    assert len(fake.feeds) == 5
    for round_, feeds in enumerate(fake.feeds):
        np.testing.assert_array_equal(feeds["x"], expected[round_ % 3]["x"])


def test_inputs_npz_reach_the_session(tmp_path, monkeypatch):
    path = save(tmp_path, tiny_model())
    x = np.arange(15, dtype=np.float32).reshape(5, 3)
    np.savez(tmp_path / "in.npz", x=x)
    fake = FakeRuns(monkeypatch, {str(path): 0.001})
    code, out, err = run_cli("bench", path, "--inputs", tmp_path / "in.npz", "--runs", "2", "--json", "-")
    assert code == 0, err
    assert all(np.array_equal(f["x"], x) for f in fake.feeds)
    assert json.loads(out)["models"][0]["batch"] == 5


# ------------------------------------------------------------- real runs
def test_measure_runs_onnxruntime(tmp_path):
    stats = measure([tiny_model(batch=8), save(tmp_path, tiny_model())], warmup=1, runs=5, threads=1,
                    shapes={"x": (8, 3)})
    assert [s.runs for s in stats] == [5, 5]
    for s in stats:
        assert 0 < s.min <= s.p50 <= s.p90 and s.min <= s.mean
        assert s.batch == 8 and s.throughput == pytest.approx(8e3 / s.p50)
    assert stats[0].model == "ModelProto 'tiny'" and stats[1].model == str(tmp_path / "m.onnx")


@pytest.mark.parametrize("ort_opt", ["all", "none"])
def test_json_report_is_parseable_and_consistent(tmp_path, ort_opt):
    a, b = save(tmp_path, tiny_model(), "a.onnx"), save(tmp_path, tiny_model(), "b.onnx")
    code, out, err = run_cli("bench", a, "--against", b, "--shape", "x=16x3", "--threads", "1", "--warmup", "2",
                             "--runs", "9", "--ort-opt", ort_opt, "--json", "-")
    assert code == 0, err
    report = json.loads(out)  # nothing but JSON on stdout
    assert report["ort_opt"] == ort_opt and report["threads"] == 1 and report["runs"] == 9
    assert [m["model"] for m in report["models"]] == [str(a), str(b)]
    first, second = report["models"]
    assert first["batch"] == 16 and first["runs"] == second["runs"] == 9
    assert report["ratio"]["p50"] == pytest.approx(second["p50"] / first["p50"])
    assert report["ratio"]["min"] == pytest.approx(second["min"] / first["min"])


def test_table_and_json_file(tmp_path):
    a, b = save(tmp_path, tiny_model(), "a.onnx"), save(tmp_path, tiny_model(), "b.onnx")
    json_path = tmp_path / "r.json"
    code, out, err = run_cli("bench", a, "--against", b, "--shape", "x=2x3", "--runs", "3", "--json", json_path)
    assert code == 0, err
    assert "p50 ms" in out and "a.onnx" in out and "b.onnx" in out and "(> 1: the first is faster)" in out
    assert json.loads(json_path.read_text())["ratio"] is not None


# ------------------------------------------------------------- bad input
def test_against_with_other_input_names_is_a_clear_error(tmp_path):
    a, b = save(tmp_path, tiny_model("x"), "a.onnx"), save(tmp_path, tiny_model("images"), "b.onnx")
    code, out, err = run_cli("bench", a, "--against", b, "--shape", "x=1x3")
    assert_bad_input(code, out, err)
    assert "takes different inputs" in err and "images" in err and "x: float32" in err


def test_against_with_other_fixed_sizes_is_a_clear_error(tmp_path):
    a, b = save(tmp_path, tiny_model(batch=2), "a.onnx"), save(tmp_path, tiny_model(batch=3), "b.onnx")
    code, out, err = run_cli("bench", a, "--against", b)
    assert_bad_input(code, out, err)
    assert "b.onnx: does not match the model inputs" in err and "x: float32[3,3]" in err


@pytest.mark.parametrize("args, words", [
    (["missing.onnx"], ["missing.onnx", "no such file"]),
    (["{m}", "--shape", "x=1x2x3"], ["3 dimensions", "declares 2"]),
    (["{m}", "--shape", "x=axb"], ["not of the form"]),
    (["{m}", "--shape", "y=1x3"], ["not an input"]),
    (["{m}", "--shape", "x=1x4"], ["fixed to 3"]),
    (["{m}"], ["dynamic dimension", "--shape x=Nx3"]),
    (["{m}", "--inputs", "nope.npz"], ["nope.npz", "no such file"]),
    (["{m}", "--inputs", "{npz}", "--shape", "x=1x3"], ["either input data or shapes"]),
    (["{m}", "--against", "missing.onnx", "--shape", "x=1x3"], ["missing.onnx", "no such file"]),
])
def test_bad_input_is_one_line(tmp_path, args, words):
    model = save(tmp_path, tiny_model())
    np.savez(tmp_path / "in.npz", x=np.zeros((1, 3), np.float32))
    args = [a.format(m=model, npz=tmp_path / "in.npz") if a.startswith("{") else a for a in args]
    args = [str(tmp_path / a) if a.endswith((".onnx", ".npz")) and "/" not in a else a for a in args]
    code, out, err = run_cli("bench", *args)
    assert_bad_input(code, out, err)
    for word in words:
        assert word in err


@pytest.mark.parametrize("option", [["--runs", "0"], ["--threads", "0"], ["--warmup", "-1"]])
def test_bad_counts_are_usage_errors(tmp_path, option):
    code, out, err = run_cli("bench", save(tmp_path, tiny_model(batch=1)), *option)
    assert code == 2 and "Invalid value" in err


def test_measure_rejects_bad_counts_and_no_model():
    with pytest.raises(NormfoldError, match="runs >= 1"):
        measure([tiny_model(batch=1)], runs=0)
    with pytest.raises(NormfoldError, match="no model"):
        measure([])


def test_cuda_without_gpu_is_a_clear_error(tmp_path):
    json_path = tmp_path / "r.json"
    code, out, err = run_cli("bench", save(tmp_path, tiny_model(batch=1)), "--provider", "cuda", "--json", json_path)
    if code == 0:
        pytest.skip("a usable CUDA GPU is present")
    assert_bad_input(code, out, err)
    assert "execution provider 'cuda'" in err and "--provider cpu" in err
    assert not json_path.exists()


def test_bench_leaves_the_model_files_alone(tmp_path):
    a, b = save(tmp_path, tiny_model(), "a.onnx"), save(tmp_path, tiny_model(), "b.onnx")
    before = [p.read_bytes() for p in (a, b)]
    assert run_cli("bench", a, "--against", b, "--shape", "x=1x3", "--runs", "2", "-q")[0] == 0
    assert [p.read_bytes() for p in (a, b)] == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx", "b.onnx"]


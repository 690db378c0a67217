"""The zoo latency benchmark's measurements (benchmarks/bench_zoo_isolated.py): the profiler
shares and reorder counts against onnxruntime's own optimized graph, the timing process, the
per-round statistics against numpy."""

from __future__ import annotations

import argparse
import datetime

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from benchmarks.bench_zoo_isolated import MAX_RUNS, MIN_RUNS, profile_shares, ratio_stats, time_one, write_results
from tests.helpers.graphs import G


def conv_norm_conv(c: int = 16, hw: int = 16) -> tuple[onnx.ModelProto, dict]:
    """Conv → InstanceNormalization → Sigmoid (named "act") → Conv: a norm between two convolutions."""
    g = G(opset=17)
    y = g.conv(g.input([1, c, hw, hw], name="x"), c, c, [3, 3], pads=[1, 1, 1, 1])
    y = g.op("InstanceNormalization", [y, g.const(g.randn([c])), g.const(g.randn([c]))], epsilon=1e-5)
    y = g.op("Sigmoid", [y], name="act")
    g.conv(y, c, c, [3, 3], pads=[1, 1, 1, 1], name="last")
    g.nodes[-1].output[0] = "y"
    g.output("y")
    return g.model(), g.feeds


def reorders_in_optimized_graph(model: onnx.ModelProto, tmp_path) -> int:
    """How many NCHWc reorder nodes onnxruntime's ORT_ENABLE_ALL graph holds (its saved graph)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = 1
    options.optimized_model_filepath = str(tmp_path / "ort.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return sum(n.op_type in ("ReorderInput", "ReorderOutput") for n in onnx.load(tmp_path / "ort.onnx").graph.node)


def test_profile_counts_the_reorders_onnxruntime_inserts_around_a_norm_between_convs(tmp_path):
    model, feeds = conv_norm_conv()
    shares = profile_shares(model, feeds, replaced=set())
    expected = reorders_in_optimized_graph(model, tmp_path)
    assert expected >= 2  # NCHWc on this x86 machine: out of the first conv, back into the second
    assert shares["reorders"] == expected
    assert 0 < shares["reorder_share"] < 1 and 0 < shares["norm_share"] < 1
    assert shares["norm_share"] + shares["reorder_share"] < 1  # the convolutions take the rest
    assert shares["norm_ms"] <= shares["kernel_ms"]


def test_replaced_nodes_count_as_norm_time_whatever_they_run_as():
    model, feeds = conv_norm_conv()
    plain = profile_shares(model, feeds, replaced=set())
    with_act = profile_shares(model, feeds, replaced={"act"})  # the Sigmoid counted as a norm
    assert with_act["norm_share"] > 1.3 * plain["norm_share"]


def test_time_one_reports_medians_of_both_settings_within_the_run_limits(tmp_path):
    model, feeds = conv_norm_conv(hw=8)
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "f.npz", **feeds)
    found = time_one(str(tmp_path / "m.onnx"), str(tmp_path / "f.npz"), threads=2, budget_s=0.05)
    assert found["cpu1"] > 0 and found["wall"] > 0
    assert MIN_RUNS <= found["cpu1_runs"] <= MAX_RUNS and MIN_RUNS <= found["wall_runs"] <= MAX_RUNS


@pytest.mark.parametrize("before, after", [([2.0, 4.0, 6.0, 8.0], [1.0, 2.0, 2.0, 2.0]), ([1.0] * 3, [1.0] * 3)])
def test_ratio_stats_are_the_median_ratio_and_half_the_iqr(before, after):
    ratios = np.array(before) / np.array(after)
    median, noise = ratio_stats(before, after)
    assert median == pytest.approx(np.median(ratios))
    assert noise == pytest.approx((np.quantile(ratios, 0.75) - np.quantile(ratios, 0.25)) / 2)


def test_a_new_run_replaces_the_table_and_keeps_the_notes(tmp_path):
    out = tmp_path / "RESULTS.md"
    out.write_text("# old header\n\n| old | table |\n\n## Notes\n\nWhat the last run showed.\n")
    args = argparse.Namespace(out=out, configs="dy18", rounds=1, budget=0.1, threads=2)
    write_results([{"arch": "vae", "config": "dy18", "skipped": "not exported"}], args, datetime.datetime(2026, 1, 1),
                  0.5, 3.0)
    text = out.read_text()
    assert "| old | table |" not in text and "`vae` × `dy18`: not exported" in text
    assert text.endswith("## Notes\n\nWhat the last run showed.\n") and text.count("## Notes") == 1


def test_prepare_case_runs_the_passes_normfold_optimize_runs(tmp_path, monkeypatch):
    """The benchmark's optimized model is what `normfold optimize` writes: its default passes (canonicalize and
    fold-affine included; without canonicalize a TorchScript LlamaRMSNorm keeps its weight Mul outside the norm)."""
    import normfold.pipeline.files as files
    from benchmarks.bench_zoo_isolated import prepare_case
    from normfold.passes.registry import parse_passes

    class Stop(Exception):
        pass

    seen = {}

    def record(*args, passes, **kwargs):
        seen["passes"] = passes
        raise Stop

    monkeypatch.setattr(files, "optimize_file", record)
    with pytest.raises(Stop):
        prepare_case("resnet", "ts17", tmp_path)
    assert seen["passes"] == parse_passes(None)
    assert {"canonicalize", "fold-affine"} <= set(seen["passes"])

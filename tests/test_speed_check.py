"""`normfold optimize` is never slower: the speed check times the result against
the input model and leaves unfused the kinds that cost time (normfold.pipeline.speed_check,
normfold.runtime.timing)."""

from __future__ import annotations

import json
import time
from itertools import groupby

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from click.testing import CliRunner
from hypothesis import given, strategies as st

import normfold.passes.fuse.fuse_norms as fuse_norms
from normfold.cli.main import main
from normfold.errors import NormfoldError
from normfold.pipeline.files import optimize_file
from normfold.pipeline.speed_check import CHUNKS, check_speed, default_threads, spread_rounds
from normfold.runtime.timing import MIN_ROUNDS, compare, time_rounds
from tests.helpers.graphs import G, count_op, ort_run
from tests.test_cli_fold_bn import assert_bad_input, run_cli
from tests.helpers.norm_graphs import affine, group_norm, layer_norm, silu

LN_OPS = ("LayerNormalization", "LayerNorm")


def gn_ln_model(c: int = 16, hw: int = 32, dynamic: bool = False) -> onnx.ModelProto:
    """Conv → GroupNorm+SiLU → LayerNorm over the last axis: two fusable kinds (gn, ln)."""
    g = G(opset=17, rng=np.random.default_rng(3))
    x = g.input(["N" if dynamic else 1, c, hw, hw], name="x", value=np.zeros((1, c, hw, hw)))
    y = g.conv(x, c, c, [3, 3], pads=[1, 1, 1, 1])
    y = silu(g, affine(g, group_norm(g, y, c, 4, 1e-5), g.randn([c, 1, 1]) + 1, g.randn([c, 1, 1])))
    y = affine(g, layer_norm(g, y, [-1], 1e-5), g.randn([hw]) + 1, g.randn([hw]))
    g.op("Identity", [y], outputs=["y"])
    g.output("y", shape=["N" if dynamic else 1, c, hw, hw])
    return g.model()


def gn_convnext_ln_model(c: int = 32, hw: int = 64) -> onnx.ModelProto:
    """Conv → GroupNorm → ConvNeXt's channel-first LayerNorm: the custom LayerNorm is
    about 2x the exported subgraph's speed at this size."""
    g = G(opset=17, rng=np.random.default_rng(4))
    y = g.conv(g.input([1, c, hw, hw], name="x"), c, c, [1, 1])
    y = affine(g, group_norm(g, y, c, 4, 1e-5), g.randn([c, 1, 1]) + 1, g.randn([c, 1, 1]))
    y = affine(g, layer_norm(g, y, [1], 1e-6), g.randn([c, 1, 1]) + 1, g.randn([c, 1, 1]))
    g.op("Identity", [y], outputs=["y"])
    g.output("y", shape=[1, c, hw, hw])
    return g.model()


def fused_ops(model: onnx.ModelProto) -> dict[str, int]:
    return {op: count_op(model, op) for op in ("GroupNorm", *LN_OPS)}


def cost_timer(cost, calls: list, seed: int = 0):
    """A timer for `check_speed`: each model's per-run time is cost(model) (ms) with
    ±3% noise per run; records the models of each call."""
    rng = np.random.default_rng(seed)

    def timer(models, feeds, *, budget_s, provider, threads):
        calls.append((models, budget_s))
        base = np.array([cost(m) for m in models]) * 1e-3
        return base * rng.uniform(0.97, 1.03, size=(30, len(models)))

    return timer


def node_cost(model: onnx.ModelProto, ln_extra: float = 0.0, any_fused_extra: float = 0.0) -> float:
    """0.1 ms per node, plus `ln_extra` per fused LayerNorm, plus `any_fused_extra`
    once when anything is fused."""
    fused = fused_ops(model)
    ln = sum(fused[op] for op in LN_OPS)
    return 0.1 * len(model.graph.node) + ln_extra * ln + (any_fused_extra if any(fused.values()) else 0.0)


@pytest.fixture
def src(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(gn_ln_model(), path)
    return path


def test_a_kind_that_makes_the_model_slower_is_reverted_and_reported(src, tmp_path):
    calls = []
    out = tmp_path / "o.onnx"
    summary = optimize_file(src, out, inplace=False, passes=("fold-bn", "fuse", "cleanup"),
                            measure={"budget_s": 3.0, "threads": (None,),
                                     "timer": cost_timer(lambda m: node_cost(m, ln_extra=5.0), calls)})
    check = summary.speed
    assert check.fused == ("gn", "ln")
    assert check.first.slower and [r.family for r in check.reverted] == ["ln"]
    assert check.reverted[0].gain.faster and check.kept == ("gn", "rms", "frn")
    assert check.result.faster  # GroupNorm alone fused: fewer nodes, no LayerNorm penalty
    # three timings, a third of the budget each, in CHUNKS fresh session pairs
    assert [b for _, b in calls] == [1.0 / CHUNKS] * (3 * CHUNKS)
    assert len(calls[CHUNKS][0]) == 4  # every kind fused, gn left out, ln left out, both left out
    written = onnx.load(out)
    assert fused_ops(written) == {"GroupNorm": 1, "LayerNormalization": 0, "LayerNorm": 0}
    assert summary.verification.passed
    data = summary.to_dict()["speed"]
    assert data["reverted"][0]["family"] == "ln" and data["reverted"][0]["speedup"] > 1
    assert data["speedup"] == check.result.ratio and data["noise"] == check.result.noise
    assert data["all_fused"]["speedup"] < 1 and data["fused"] == ["gn", "ln"]


def test_kinds_that_do_not_slow_the_model_are_kept_after_one_timing(src, tmp_path):
    calls = []
    out = tmp_path / "o.onnx"
    summary = optimize_file(src, out, inplace=False, passes=("fuse",), check=None, measure={
        "threads": (None,), "timer": cost_timer(node_cost, calls)})
    assert len(calls) == CHUNKS and summary.speed.reverted == [] and summary.speed.result.faster
    assert summary.speed.result is summary.speed.first
    assert fused_ops(onnx.load(out)) == {"GroupNorm": 1, "LayerNormalization": 1, "LayerNorm": 0}


def test_every_kind_is_reverted_when_only_all_together_cost_time(src, tmp_path):
    calls = []
    summary = optimize_file(src, tmp_path / "o.onnx", inplace=False, passes=("fuse",), check=None, measure={
        "timer": cost_timer(lambda m: node_cost(m, any_fused_extra=4.0), calls)})
    assert [r.family for r in summary.speed.reverted] == ["gn", "ln"]
    assert all(not r.gain.slower for r in summary.speed.reverted)
    assert fused_ops(onnx.load(tmp_path / "o.onnx")) == {"GroupNorm": 0, "LayerNormalization": 0, "LayerNorm": 0}


def test_a_slower_model_with_nothing_fused_is_reported_not_changed(tmp_path):
    g = G(opset=17)
    y = g.conv(g.input([1, 4, 8, 8], name="x"), 4, 4, [1, 1])
    g.op("Identity", [y], outputs=["y"])
    g.output("y")
    onnx.save(g.model(), tmp_path / "c.onnx")
    calls = []
    summary = optimize_file(tmp_path / "c.onnx", tmp_path / "o.onnx", inplace=False, passes=("fuse", "cleanup"),
                            check=None, measure={"threads": (2,), "timer": cost_timer(
                                lambda m: 1.0 if len(m.graph.node) > 1 else 2.0, calls)})
    assert len(calls) == CHUNKS and summary.speed.result.slower and summary.speed.fused == ()


def threaded_cost_timer(cost, calls: list, seed: int = 0):
    """As `cost_timer`, with cost(model, threads) and the thread count of each call recorded."""
    rng = np.random.default_rng(seed)

    def timer(models, feeds, *, budget_s, provider, threads):
        calls.append((len(models), threads))
        base = np.array([cost(m, threads) for m in models]) * 1e-3
        return base * rng.uniform(0.97, 1.03, size=(30, len(models)))

    return timer


def test_by_default_a_kind_slower_only_at_one_thread_is_reverted(src, tmp_path, monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    calls = []
    timer = threaded_cost_timer(lambda m, n: node_cost(m, ln_extra=5.0 if n == 1 else 0.0), calls)
    summary = optimize_file(src, tmp_path / "o.onnx", inplace=False, passes=("fuse",), check=None,
                            measure={"timer": timer})
    check = summary.speed
    assert check.threads == (1, None)
    one, default = check.timings
    assert one.first.slower and default.first.faster  # fused LayerNorm: slower at 1 thread, faster at the default
    assert [(r.family, r.threads) for r in check.reverted] == [("ln", 1)] and check.reverted[0].gain.faster
    assert one.result.faster and default.result.faster  # GroupNorm alone fused: faster at both
    # the kinds are left out only at the thread count where the model was slower; the result is timed at both
    assert [c for c, _ in groupby(calls)] == [(2, 1), (2, None), (4, 1), (2, 1), (2, None)]
    assert fused_ops(onnx.load(tmp_path / "o.onnx")) == {"GroupNorm": 1, "LayerNormalization": 0, "LayerNorm": 0}
    data = summary.to_dict()["speed"]
    assert data["threads"] == [1, None] and [t["threads"] for t in data["by_threads"]] == [1, None]
    assert data["speedup"] == min(t["result"]["speedup"] for t in data["by_threads"])
    assert data["all_fused"]["speedup"] == one.first.ratio < 1 and data["reverted"][0]["threads"] == 1


def test_a_kind_that_helps_at_one_thread_count_is_still_reverted_where_it_costs_time(src, tmp_path):
    calls = []
    timer = threaded_cost_timer(lambda m, n: node_cost(m, ln_extra=5.0 if n == 4 else 0.0), calls)
    check = optimize_file(src, tmp_path / "o.onnx", inplace=False, passes=("fuse",), check=None,
                          measure={"timer": timer, "threads": (1, 4)}).speed
    assert check.threads == (1, 4) and [(r.family, r.threads) for r in check.reverted] == [("ln", 4)]
    assert check.timings[0].first.faster and not check.timings[0].result.slower


def test_one_cpu_times_only_onnxruntimes_choice(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 1)
    assert default_threads() == (None,)
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert default_threads() == (1, None)


def scripted_timer(slowdowns: dict[int, list[float]], calls: list, seed: int = 0):
    """A timer whose per-run times (1 ms times `slowdowns[len(models)]`, by position, ±3% noise
    per run) depend only on how many models a call times."""
    rng = np.random.default_rng(seed)

    def timer(models, feeds, *, budget_s, provider, threads):
        calls.append(len(models))
        return 1e-3 * np.array(slowdowns[len(models)]) * rng.uniform(0.97, 1.03, size=(30, len(models)))

    return timer


def test_once_the_model_is_slower_a_kind_stays_only_where_leaving_it_out_is_slower(src, tmp_path):
    # every kind fused: 10% slower than the input. Left out: gn costs 10% (gn helps), ln is
    # within noise of the fused model (an inconclusive timing), both together cost 5%.
    calls = []
    timer = scripted_timer({2: [1.0, 1.1], 4: [1.0, 1.1, 1.0, 1.05]}, calls)
    summary = optimize_file(src, tmp_path / "o.onnx", inplace=False, passes=("fuse",), check=None,
                            measure={"timer": timer, "threads": (None,)})
    check = summary.speed
    assert check.first.slower and [r.family for r in check.reverted] == ["ln"]
    assert not check.reverted[0].gain.slower and not check.reverted[0].gain.faster
    assert fused_ops(onnx.load(tmp_path / "o.onnx")) == {"GroupNorm": 1, "LayerNormalization": 0, "LayerNorm": 0}
    assert calls == [2] * CHUNKS + [4] * CHUNKS + [2] * CHUNKS


def test_spread_rounds_makes_chunks_of_fresh_sessions_until_the_budget_is_spent():
    calls = []

    def slow_timer(models, feeds, *, budget_s, provider, threads):
        calls.append(budget_s)
        time.sleep(0.03)
        return np.full((5, len(models)), float(len(calls)))

    times = spread_rounds(slow_timer, ["a", "b"], {}, budget_s=0.1, provider="cpu", threads=None)
    assert 3 <= len(calls) <= 5 and all(b == 0.1 / CHUNKS for b in calls)  # stops once 0.1 s is spent
    assert times.shape == (5 * len(calls), 2) and list(times[::5, 0]) == list(range(1, len(calls) + 1))
    calls.clear()
    assert spread_rounds(slow_timer, ["a"], {}, budget_s=0.0, provider="cpu", threads=None).shape == (5, 1)
    assert len(calls) == 1  # at least one call, even with no budget
    calls.clear()
    fast = spread_rounds(lambda models, feeds, **kw: calls.append(1) or np.ones((5, 1)), ["a"], {}, budget_s=10.0,
                         provider="cpu", threads=None)
    assert len(calls) == CHUNKS and fast.shape == (5 * CHUNKS, 1)  # at most CHUNKS calls


def add_work_to(family: str, monkeypatch, copies: int = 30):
    """Make the fuse pass slow down every norm of `family` it fuses: `copies` exact
    no-op `Max(x, x)` nodes in front of the fused node (onnxruntime keeps them)."""
    emit = fuse_norms.emit

    def slow_emit(graph, names, fused, target, opset):
        into, replaced = emit(graph, names, fused, target, opset)
        if fused.family == family:
            node = graph.nodes[-1]
            x = node.inputs[0]
            for i in range(copies):
                y = gs.Variable(names.fresh(f"{x.name}_max"), dtype=x.dtype, shape=x.shape)
                graph.nodes.append(gs.Node("Max", names.fresh("slow_Max"), inputs=[x, x], outputs=[y]))
                x = y
            node.inputs[0] = x
            graph.toposort()
        return into, replaced

    monkeypatch.setattr(fuse_norms, "emit", slow_emit)


@pytest.fixture
def convnext_src(tmp_path):
    path = tmp_path / "cf.onnx"
    onnx.save(gn_convnext_ln_model(), path)
    return path


def test_measured_for_real_a_slowed_kind_is_reverted_and_a_fast_one_kept(convnext_src, tmp_path, monkeypatch):
    add_work_to("gn", monkeypatch)
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    result = CliRunner().invoke(main, ["optimize", str(convnext_src), "-o", str(out), "--measure-budget", "3",
                                       "--threads", "1", "--json", str(report)])
    assert result.exit_code == 0, result.output
    speed = json.loads(report.read_text())["speed"]
    assert [r["family"] for r in speed["reverted"]] == ["gn"], speed
    assert speed["all_fused"]["speedup"] < 1 and speed["reverted"][0]["low"] > 1
    assert speed["threads"] == [1] and speed["provider"] == "cpu" and speed["result"]["rounds"] >= MIN_ROUNDS
    written = onnx.load(out)
    assert count_op(written, "Max") == 0 and count_op(written, "GroupNorm") == 0
    assert count_op(written, "LayerNorm") == 1
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 32, 64, 64)).astype(np.float32)}
    np.testing.assert_allclose(ort_run(written, feeds)[0], ort_run(onnx.load(convnext_src), feeds)[0],
                               rtol=1e-3, atol=1e-4)


def test_table_states_the_speedup_and_what_was_reverted(convnext_src, tmp_path, monkeypatch):
    add_work_to("gn", monkeypatch)
    result = CliRunner().invoke(main, ["optimize", str(convnext_src), "-o", str(tmp_path / "o.onnx"), "--measure-budget",
                                       "2", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "speed-up" in result.output and "GroupNorm (+SiLU) left unfused" in result.output
    assert "reverted (made the model slower beyond noise): GroupNorm (+SiLU)" in " ".join(result.output.split())


def test_no_measure_skips_the_check(src, tmp_path):
    report = tmp_path / "r.json"
    result = CliRunner().invoke(main, ["optimize", str(src), "-o", str(tmp_path / "o.onnx"), "--no-measure",
                                       "--json", str(report)])
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert "speed" not in data and data["written"]
    assert fused_ops(onnx.load(tmp_path / "o.onnx"))["GroupNorm"] == 1


def test_json_of_a_real_check(src, tmp_path):
    result = CliRunner().invoke(main, ["optimize", str(src), "-o", str(tmp_path / "o.onnx"), "--measure-budget",
                                       "0.5", "--json", "-"])
    assert result.exit_code == 0, result.output
    speed = json.loads(result.output)["speed"]
    assert set(speed) >= {"provider", "threads", "budget_s", "speedup", "noise", "result", "all_fused", "fused",
                          "reverted"}
    res = speed["result"]
    assert res["low"] <= res["speedup"] <= res["high"] and res["baseline_ms"] > 0 and res["candidate_ms"] > 0
    assert speed["budget_s"] == 0.5 and speed["fused"] == ["gn", "ln"]
    assert speed["noise"] == pytest.approx((res["high"] - res["low"]) / 2)


def test_each_thread_count_given_is_timed_and_reported(src, tmp_path):
    args = ["optimize", str(src), "-o", str(tmp_path / "o.onnx"), "--measure-budget", "0", "--no-check"]
    result = CliRunner().invoke(main, args + ["--threads", "1", "--threads", "2", "--threads", "1", "--json", "-"])
    assert result.exit_code == 0, result.output
    speed = json.loads(result.output)["speed"]
    assert speed["threads"] == [1, 2] and [t["threads"] for t in speed["by_threads"]] == [1, 2]
    assert all(t["result"]["rounds"] >= MIN_ROUNDS for t in speed["by_threads"])
    table = CliRunner().invoke(main, args + ["--threads", "1", "--threads", "2"])
    assert table.exit_code == 0, table.output
    written = [line for line in table.output.splitlines() if "written" in line]
    assert len(written) == 2 and "1 thread " in written[0] and "2 threads" in written[1], table.output


def test_the_check_times_on_the_measure_provider(src, tmp_path):
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    before = src.read_bytes()
    code, stdout, stderr = run_cli("optimize", src, "-o", out, "--measure-provider", "cuda", "--measure-budget", "0",
                                   "--threads", "1", "--json", report)
    assert src.read_bytes() == before
    if code == 0:  # a usable GPU: the check ran on it
        assert json.loads(report.read_text())["speed"]["provider"] == "cuda" and out.exists()
        return
    assert_bad_input(code, stdout, stderr)
    assert "execution provider 'cuda'" in stderr and "--measure-provider cpu" in stderr
    assert not out.exists() and not report.exists()


def test_dynamic_sizes_are_1_unless_given(tmp_path):
    onnx.save(gn_ln_model(dynamic=True), tmp_path / "d.onnx")
    args = ["optimize", str(tmp_path / "d.onnx"), "-o", str(tmp_path / "o.onnx"), "--measure-budget", "0",
            "--json", "-"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["speed"]["shapes"] == {"x": [1, 16, 32, 32]}
    given = CliRunner().invoke(main, args + ["--shape", "x=2x16x32x32"])
    assert json.loads(given.output)["speed"]["shapes"] == {"x": [2, 16, 32, 32]}


def test_time_rounds_keeps_to_the_budget_and_the_minimum():
    model = gn_ln_model(c=4, hw=8)
    feeds = {"x": np.zeros((1, 4, 8, 8), np.float32)}
    times = time_rounds([model, model], feeds, budget_s=0.0)
    assert times.shape == (MIN_ROUNDS, 2) and (times > 0).all()
    assert 0.3 <= compare(times[:, 0], times[:, 1]).ratio <= 3


def test_compare_takes_the_order_statistics_around_the_median():
    base = np.array([2.0, 3.0, 4.0, 5.0, 6.0])
    c = compare(base, np.ones(5))
    assert (c.ratio, c.low, c.high, c.rounds) == (4.0, 2.0, 6.0, 5) and c.faster and not c.slower
    ratios = np.linspace(0.5, 1.49, 100)
    c = compare(ratios[::-1].copy(), np.ones(100))
    assert (c.low, c.high) == (ratios[40], ratios[59]) and not c.faster and not c.slower


@given(st.lists(st.tuples(st.floats(0.1, 10.0), st.floats(0.1, 10.0)), min_size=5, max_size=61)
       .filter(lambda v: len(v) % 2 == 1))
def test_compare_is_symmetric_and_brackets_the_median(times):
    a, b = np.asarray(times).T
    forward, backward = compare(a, b), compare(b, a)
    assert forward.low <= forward.ratio <= forward.high
    assert forward.ratio == pytest.approx(1 / backward.ratio)
    assert forward.low == pytest.approx(1 / backward.high)


def test_bad_inputs_to_the_check_are_one_line_errors(src):
    with pytest.raises(NormfoldError, match="not an input"):
        check_speed(onnx.load(src), ("fuse",), shapes=["y=1x16x32x32"])

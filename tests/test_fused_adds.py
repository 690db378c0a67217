"""Adds fused into the norm: com.normfold.SkipLayerNorm / SkipRMSNorm (and the ...Sum ops
that also output the sum) and BiasGroupNorm against PyTorch, with and without normfold's library, and the fuse
pass that writes them (normfold.passes.fuse.fused_adds)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

import normfold
from normfold.ops.library import ops_library_path
from normfold.ops.portable import embed_functions
from normfold.runtime.session import make_session
from tests.helpers.graphs import G, count_op, ort_run
from tests.test_custom_ops import assert_close
from tests.helpers.norm_graphs import affine, group_norm, layer_norm, normalize, silu

ONNX_TYPES = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16, np.float64: TensorProto.DOUBLE}
LEVELS = {"ORT_DISABLE_ALL": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
          "ORT_ENABLE_ALL": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}


def skip_model(op: str, shape, d: int, dtype=np.float32, with_sum: bool = False, bias: bool = True,
               attrs: dict | None = None, static: bool = True) -> onnx.ModelProto:
    """One com.normfold Skip* node on graph inputs X, skip, scale (and bias), with its function body."""
    elem = ONNX_TYPES[dtype]
    names = ["X", "skip", "scale", *(["bias"] if bias and op == "SkipLayerNorm" else [])]
    shapes = {"X": shape, "skip": shape, "scale": (d,), "bias": (d,)}
    outputs = ["Y", "sum"] if with_sum else ["Y"]
    node = helper.make_node(op + ("Sum" if with_sum else ""), names, outputs, domain="com.normfold",
                            **({"epsilon": 1e-5} if attrs is None else attrs))
    graph = helper.make_graph([node], op, [helper.make_tensor_value_info(n, elem, list(shapes[n]) if static else None)
                                           for n in names],
                              [helper.make_tensor_value_info(o, elem, None) for o in outputs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.normfold", 1)],
                              ir_version=10)
    leaves_out_bias = op == "SkipLayerNorm" and not bias  # bodies take every input: such a node has none
    assert bool(embed_functions(model).skipped) == leaves_out_bias
    return model


def feeds_for(op, shape, d, dtype, rng, offset=0.0, bias=True):
    feeds = {"X": (rng.standard_normal(shape) * 2 + offset).astype(dtype),
             "skip": rng.standard_normal(shape).astype(dtype), "scale": (rng.standard_normal(d) + 1).astype(dtype)}
    if bias and op == "SkipLayerNorm":
        feeds["bias"] = rng.standard_normal(d).astype(dtype)
    return feeds


def reference(op, feeds, axis=-1, epsilon=1e-5):
    """float64 PyTorch of the sum, and the sum in the input type. An fp16 sum is added in float32 and
    normalized unrounded, as onnxruntime runs the function body (its CPU provider has no fp16 Add: the
    Add runs in float32 between Casts, and the Cast pair before the norm's up-cast is removed)."""
    dtype = feeds["X"].dtype
    exact = feeds["X"].astype(np.float32 if dtype == np.float16 else dtype) + feeds["skip"]
    total = exact.astype(dtype)
    s = torch.from_numpy(exact.astype(np.float64))
    dims = s.shape[axis % s.dim():]
    scale = torch.from_numpy(feeds["scale"].astype(np.float64)).reshape(dims)
    if op == "SkipLayerNorm":
        bias = torch.from_numpy(feeds["bias"].astype(np.float64)).reshape(dims) if "bias" in feeds else None
        y = F.layer_norm(s, dims, scale, bias, epsilon)
    else:
        y = F.rms_norm(s, dims, scale, epsilon)
    return y.numpy(), total


def four_ways(model) -> dict[str, ort.InferenceSession]:
    """Sessions at ORT_DISABLE_ALL and ORT_ENABLE_ALL, with normfold's library and without (bodies inlined)."""
    sessions = {}
    for name, level in LEVELS.items():
        for library in (True, False):
            options = ort.SessionOptions()
            options.graph_optimization_level = level
            if library:
                options.register_custom_ops_library(ops_library_path())
            sessions[f"{name}, {'library' if library else 'inlined body'}"] = ort.InferenceSession(
                model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return sessions


def run_library(model, feeds, threads=2):
    return make_session(model, threads=threads).run(None, feeds)


# ------------------------------------------------------------------------ kernels vs PyTorch

@settings(max_examples=40)
@given(op=st.sampled_from(["SkipLayerNorm", "SkipRMSNorm"]), rows=st.integers(1, 9), d=st.integers(1, 1500),
       offset=st.sampled_from([0.0, 100.0]), with_sum=st.booleans(), bias=st.booleans(), seed=st.integers(0, 99))
def test_skip_norm_matches_torch(op, rows, d, offset, with_sum, bias, seed):
    rng = np.random.default_rng(seed)
    shape = (rows, d) if rows % 2 else (1, rows, d)
    feeds = feeds_for(op, shape, d, np.float32, rng, offset, bias)
    got = run_library(skip_model(op, shape, d, with_sum=with_sum, bias=bias), feeds)
    want, total = reference(op, feeds)
    assert_close(got[0], want, np.float32)
    if with_sum:
        np.testing.assert_array_equal(got[1], total)


@pytest.mark.parametrize("op", ["SkipLayerNorm", "SkipRMSNorm"])
@pytest.mark.parametrize("shape", [(2, 100_000), (3, 70_001), (64, 3000)])  # rows split across tasks, or not
@pytest.mark.parametrize("with_sum", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_skip_norm_large_rows_and_threads(op, shape, with_sum, threads, rng):
    feeds = feeds_for(op, shape, shape[-1], np.float32, rng)
    got = run_library(skip_model(op, shape, shape[-1], with_sum=with_sum), feeds, threads)
    want, total = reference(op, feeds)
    assert_close(got[0], want, np.float32)
    if with_sum:
        np.testing.assert_array_equal(got[1], total)


@pytest.mark.parametrize("op", ["SkipLayerNorm", "SkipRMSNorm"])
@pytest.mark.parametrize("dtype", [np.float16, np.float64])
@pytest.mark.parametrize("with_sum", [False, True])
def test_skip_norm_fp16_fp64(op, dtype, with_sum, rng):
    shape = (4, 7, 384)
    feeds = feeds_for(op, shape, 384, dtype, rng)
    got = run_library(skip_model(op, shape, 384, dtype, with_sum), feeds)
    want, total = reference(op, feeds)
    assert got[0].dtype == dtype
    assert_close(got[0], want, dtype)
    if with_sum:
        np.testing.assert_array_equal(got[1], total)  # the sum in the input type, as onnxruntime's Add


@pytest.mark.parametrize("with_sum", [False, True])
def test_skip_norm_axis_over_two_axes_and_dynamic_shapes(with_sum, rng):
    shape = (3, 5, 8, 16)
    feeds = feeds_for("SkipLayerNorm", shape, 128, np.float32, rng)
    got = run_library(skip_model("SkipLayerNorm", shape, 128, with_sum=with_sum,
                                 attrs={"axis": -2, "epsilon": 1e-3}, static=False), feeds)
    want, total = reference("SkipLayerNorm", feeds, axis=-2, epsilon=1e-3)
    assert_close(got[0], want, np.float32)
    if with_sum:
        np.testing.assert_array_equal(got[1], total)


@pytest.mark.parametrize("op, attrs, shapes, message", [
    ("SkipRMSNorm", {}, {}, "SkipRMSNorm: epsilon must be set"),
    ("SkipLayerNorm", {"epsilon": -1.0}, {}, "epsilon must be >= 0"),
    ("SkipLayerNorm", {"epsilon": 1e-5}, {"skip": (2, 3, 9)}, "skip must have X's shape"),
    ("SkipLayerNorm", {"epsilon": 1e-5, "axis": 3}, {}, "axis=3 is out of range"),
    ("SkipRMSNorm", {"epsilon": 1e-5}, {"scale": (7,)}, "scale"),
])
def test_bad_attributes_and_shapes_fail_at_session_creation(op, attrs, shapes, message):
    model = skip_model(op, (2, 3, 8), 8, attrs=attrs)
    for value in model.graph.input:
        if value.name in shapes:
            dims = value.type.tensor_type.shape.dim
            del dims[:]
            dims.extend(onnx.TensorShapeProto.Dimension(dim_value=v) for v in shapes[value.name])
    with pytest.raises(normfold.NormfoldError, match=message):
        make_session(model)


# ------------------------------------------------------------- with and without the library

@pytest.mark.parametrize("op", ["SkipLayerNorm", "SkipRMSNorm"])
@pytest.mark.parametrize("with_sum", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_function_bodies_match_the_kernels(op, with_sum, dtype, rng):
    shape = (2, 6, 96)
    model = skip_model(op, shape, 96, dtype, with_sum)
    feeds = feeds_for(op, shape, 96, dtype, rng)
    want, total = reference(op, feeds)
    runs = {way: session.run(None, feeds) for way, session in four_ways(model).items()}
    if dtype == np.float32:
        runs["onnx.reference"] = ReferenceEvaluator(model).run(None, feeds)
    tolerance = 2e-3 if dtype == np.float16 else 1e-5
    for way, got in runs.items():
        assert len(got) == (2 if with_sum else 1), way
        error = np.abs(got[0].astype(np.float64) - want).max() / max(1.0, np.abs(want).max())
        assert error <= tolerance, f"{way}: relative error {error:.2e}"
        if with_sum:
            np.testing.assert_array_equal(got[1], total, err_msg=way)



@pytest.mark.parametrize("op", ["SkipLayerNorm", "SkipRMSNorm"])
def test_fp16_kernel_normalizes_the_sum_as_the_body_does(op):
    """x + skip where fp16 rounding of the sum loses the skip: 1024 + 0.1·k rounds to 1024 (fp16 spacing 1
    there), so a norm of the rounded sum sees a constant row; the body (and a float32 model) sees the skip."""
    d = 16
    skip = ((np.arange(d) % 5 - 2) * 0.1).astype(np.float16)
    feeds = {"X": np.full((3, d), 1024, np.float16), "skip": np.tile(skip, (3, 1)),
             "scale": np.linspace(0.5, 2, d).astype(np.float16)}
    if op == "SkipLayerNorm":
        feeds["bias"] = np.linspace(-1, 1, d).astype(np.float16)
    model = skip_model(op, (3, d), d, np.float16, with_sum=True)
    want, total = reference(op, feeds)
    runs = {way: session.run(None, feeds) for way, session in four_ways(model).items()}
    for way, (y, s) in runs.items():  # a norm of the rounded sum is off by ~1 here
        error = np.abs(y.astype(np.float64) - want).max() / max(1.0, np.abs(want).max())
        assert error <= 2e-3, f"{way}: relative error {error:.2e}"  # the body's float32 mean: ~1e-4
        np.testing.assert_array_equal(s, total, err_msg=way)  # the sum output: rounded, as the Add
        if "library" in way:
            assert_close(y, want, np.float16)

# --------------------------------------------------------------------------- the fuse pass

def block(kind: str, opset: int = 16, read_sum: bool = False, sum_is_output: bool = False, residual: str = "input",
          dynamic: bool = False, cast: bool = False):
    """x + r → decomposed LayerNorm/RMSNorm over the last axis (+affine); the sum optionally read by a Mul
    or a graph output; `residual`: "input" (computed), "constant" (a bias add) or "broadcast" ([1, 1, 64])."""
    g = G(opset=opset, rng=np.random.default_rng(5))
    batch = "B" if dynamic else 2
    x = g.input([batch, 8, 64], name="x", value=g.rng.standard_normal((2, 8, 64)))
    if residual == "input":
        r = g.op("Relu", [g.input([batch, 8, 64], name="r", value=g.rng.standard_normal((2, 8, 64)))])
    elif residual == "constant":
        r = g.const(g.randn([64]))
    else:
        r = g.input([1, 1, 64], name="r")
    s = g.op("Add", [x, r], outputs=["s"])
    normed = g.op("Cast", [s], to=TensorProto.FLOAT) if cast else s  # x.float() of a float x
    if kind == "ln":
        y = affine(g, layer_norm(g, normed, [-1], 1e-5), g.randn([64]) + 1, g.randn([64]))
    else:
        y = affine(g, normalize(g, normed, [-1], 1e-6), g.randn([64]) + 1)
    g.op("Identity", [y], outputs=["y"])
    g.output("y")
    if read_sum:
        g.op("Mul", [s, g.const(np.array(2.0))], outputs=["s2"])
        g.output("s2")
    if sum_is_output:
        g.output("s")
    return g.model(), g.feeds


def custom_ops(model):
    return sorted(n.op_type for n in model.graph.node if n.domain == "com.normfold")


@pytest.mark.parametrize("kind, op", [("ln", "SkipLayerNorm"), ("rms", "SkipRMSNorm")])
@pytest.mark.parametrize("read_sum, sum_is_output", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("target, cast", [("auto", False), ("custom", False), ("auto", True)])
def test_residual_add_is_fused_and_runs_three_ways(kind, op, read_sum, sum_is_output, target, cast):
    model, feeds = block(kind, read_sum=read_sum, sum_is_output=sum_is_output, cast=cast)
    fused, report = normfold.fuse(model, target=target)
    with_sum = read_sum or sum_is_output
    assert custom_ops(fused) == [op + ("Sum" if with_sum else "")]
    assert count_op(fused, "Add") == 0 and count_op(fused, "Cast") == 0
    assert any(c.into == f"com.normfold.{op}{'Sum' if with_sum else ''}" for c in report.changes)
    assert not report.skipped
    want = ort_run(model, feeds)
    onnx.checker.check_model(fused, full_check=True)
    assert [o.name for o in fused.graph.output] == [o.name for o in model.graph.output]
    for way, session in four_ways(fused).items():
        for a, b in zip(session.run(None, feeds), want):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=way)


def test_dynamic_batch_of_equal_symbols_is_fused():
    model, feeds = block("ln", dynamic=True)
    fused, _ = normfold.fuse(model)
    assert custom_ops(fused) == ["SkipLayerNorm"]
    np.testing.assert_allclose(make_session(fused).run(None, feeds)[0], ort_run(model, feeds)[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("residual", ["constant", "broadcast"])
def test_bias_adds_and_broadcasts_are_not_fused(residual):
    model, _ = block("ln", residual=residual)
    fused, _ = normfold.fuse(model)
    assert custom_ops(fused) == ["LayerNorm"] and count_op(fused, "Add") == 1


@pytest.mark.parametrize("read_sum", [False, True])
def test_add_into_a_standard_layer_norm_is_fused_unless_the_target_is_standard(read_sum):
    """auto writes LayerNormalization-17 for the decomposed LN; its residual add still becomes SkipLayerNorm (onnxruntime
    would fuse it into its own SkipLayerNormalization, 5-10x slower on its CPU provider); --target standard keeps both."""
    model, feeds = block("ln", opset=17, read_sum=read_sum)
    fused, report = normfold.fuse(model)
    assert custom_ops(fused) == ["SkipLayerNorm" + ("Sum" if read_sum else "")]
    assert count_op(fused, "LayerNormalization") == 0 and count_op(fused, "Add") == 0
    assert any(c.op == "Add+LayerNormalization" for c in report.changes)
    want = ort_run(model, feeds)
    for way, session in four_ways(fused).items():
        for a, b in zip(session.run(None, feeds), want):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=way)
    standard, _ = normfold.fuse(model, target="standard")
    assert custom_ops(standard) == [] and count_op(standard, "LayerNormalization") == 1 and count_op(standard, "Add") == 1


def standard_ln_block(scale_shape=(64,), stash_type=1, read_mean=False, with_bias=True):
    """x + Relu(r) → LayerNormalization-17 over the last axis, as the exporters write it at opset ≥ 17."""
    g = G(opset=17, rng=np.random.default_rng(6))
    x = g.input([2, 8, 64], name="x", value=g.rng.standard_normal((2, 8, 64)))
    r = g.op("Relu", [g.input([2, 8, 64], name="r", value=g.rng.standard_normal((2, 8, 64)))])
    s = g.op("Add", [x, r])
    params = [g.const(g.randn(list(scale_shape)) + 1), *([g.const(g.randn([64]))] if with_bias else [])]
    outputs = ["y", "mean"] if read_mean else ["y"]
    g.op("LayerNormalization", [s, *params], outputs=outputs, axis=-1, epsilon=1e-5, stash_type=stash_type)
    g.output("y")
    if read_mean:
        g.output("mean")
    return g.model(), g.feeds


@pytest.mark.parametrize("with_bias", [True, False])
def test_an_exported_standard_layer_norm_takes_its_residual_add(with_bias):
    model, feeds = standard_ln_block(with_bias=with_bias)
    fused, _ = normfold.fuse(model)
    assert custom_ops(fused) == ["SkipLayerNorm"] and count_op(fused, "Add") == 0
    np.testing.assert_allclose(make_session(fused).run(None, feeds)[0], ort_run(model, feeds)[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", [dict(scale_shape=(1,)), dict(stash_type=0), dict(read_mean=True)])
def test_standard_layer_norms_skip_layer_norm_does_not_compute_are_left(variant):
    """A broadcast scale, another stash type, or the Mean output read: the Add and the LayerNormalization stay."""
    model, _ = standard_ln_block(**variant)
    fused, _ = normfold.fuse(model)
    assert custom_ops(fused) == [] and count_op(fused, "LayerNormalization") == 1 and count_op(fused, "Add") == 1


def test_zoo_bert_residual_adds_become_skip_layer_norms():
    """The zoo's BERT (transformers), exported by dynamo at opset 18 with LayerNormalization: every residual add
    into a norm is fused, and the result matches the input model."""
    from tests.helpers.norm_models import export
    from tests.helpers.zoo import ARCHITECTURES, CONFIGS
    from tests.helpers.zoo.checks import _feeds

    config = CONFIGS["dy18"]
    module, args = ARCHITECTURES["bert"].build()
    model = export(module, args, exporter=config.exporter, opset=config.opset,
                   constant_folding=config.constant_folding, name="zoo-bert")
    optimized, _ = normfold.optimize(model)
    skips = [n for n in optimized.graph.node if n.op_type.startswith("SkipLayerNorm")]
    assert len(skips) == count_op(model, "LayerNormalization") - 1  # all but the embeddings' norm
    feeds = _feeds(model, args)
    np.testing.assert_allclose(make_session(optimized).run(None, feeds)[0], ort_run(model, feeds)[0],
                               rtol=1e-4, atol=1e-5)


def test_only_the_families_asked_for():
    model, _ = block("rms")
    fused, _ = normfold.fuse(model, ops=("ln",))
    assert custom_ops(fused) == []


# --------------------------------------------------------- per-channel add fused into GroupNorm

def bias_gn_model(shape, groups, dtype=np.float32, activation="silu", add_shape=None) -> onnx.ModelProto:
    """One com.normfold.BiasGroupNorm node on graph inputs X, add, scale, bias, with its function body."""
    elem = ONNX_TYPES[dtype]
    n, c = shape[:2]
    shapes = {"X": shape, "add": add_shape or (n, c, *[1] * (len(shape) - 2)), "scale": (c,), "bias": (c,)}
    node = helper.make_node("BiasGroupNorm", list(shapes), ["Y"], domain="com.normfold", num_groups=groups,
                            epsilon=1e-5, activation=activation)
    graph = helper.make_graph([node], "bgn", [helper.make_tensor_value_info(k, elem, list(v)) for k, v in shapes.items()],
                              [helper.make_tensor_value_info("Y", elem, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.normfold", 1)],
                              ir_version=10)
    assert not embed_functions(model).skipped
    return model


def bias_gn_feeds(shape, dtype, rng, offset=0.0):
    n, c = shape[:2]
    return {"X": (rng.standard_normal(shape) + offset).astype(dtype),
            "add": (rng.standard_normal((n, c, *[1] * (len(shape) - 2))) * 3).astype(dtype),
            "scale": (rng.standard_normal(c) + 1).astype(dtype), "bias": rng.standard_normal(c).astype(dtype)}


def bias_gn_reference(feeds, groups, activation="silu"):
    t = {k: torch.from_numpy(v.astype(np.float64)) for k, v in feeds.items()}
    y = torch.group_norm(t["X"] + t["add"], groups, t["scale"], t["bias"], 1e-5)
    return (F.silu(y) if activation == "silu" else y).numpy()


@settings(max_examples=40)
@given(n=st.integers(1, 3), groups=st.sampled_from([1, 2, 4]), per_group=st.integers(1, 6),
       spatial=st.sampled_from([(1,), (7,), (5, 9), (2, 3, 4)]), offset=st.sampled_from([0.0, 50.0]),
       activation=st.sampled_from(["none", "silu"]), seed=st.integers(0, 99))
def test_bias_group_norm_matches_torch(n, groups, per_group, spatial, offset, activation, seed):
    shape = (n, groups * per_group, *spatial)
    feeds = bias_gn_feeds(shape, np.float32, np.random.default_rng(seed), offset)
    got = run_library(bias_gn_model(shape, groups, activation=activation), feeds)[0]
    assert_close(got, bias_gn_reference(feeds, groups, activation), np.float32)


@pytest.mark.parametrize("shape, groups", [((1, 32, 128, 128), 2), ((2, 320, 32, 32), 32), ((3, 64, 65, 31), 8)])
@pytest.mark.parametrize("threads", [1, 2])
def test_bias_group_norm_large_instances_and_threads(shape, groups, threads, rng):
    feeds = bias_gn_feeds(shape, np.float32, rng)
    got = run_library(bias_gn_model(shape, groups), feeds, threads)[0]
    assert_close(got, bias_gn_reference(feeds, groups), np.float32)


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_bias_group_norm_fp16_fp64(dtype, rng):
    shape = (2, 64, 9, 11)
    feeds = bias_gn_feeds(shape, dtype, rng)
    got = run_library(bias_gn_model(shape, 8, dtype), feeds)[0]
    assert got.dtype == dtype
    assert_close(got, bias_gn_reference(feeds, 8), dtype)


def test_bias_group_norm_bad_add_shape_fails_at_session_creation():
    with pytest.raises(normfold.NormfoldError, match="BiasGroupNorm: add"):
        make_session(bias_gn_model((2, 8, 4, 4), 2, add_shape=(1, 8, 1, 1)))


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_bias_group_norm_body_matches_the_kernel(dtype, rng):
    shape = (2, 16, 6, 5)
    model = bias_gn_model(shape, 4, dtype)
    feeds = bias_gn_feeds(shape, dtype, rng)
    want = bias_gn_reference(feeds, 4)
    runs = {way: session.run(None, feeds)[0] for way, session in four_ways(model).items()}
    if dtype == np.float32:
        runs["onnx.reference"] = ReferenceEvaluator(model).run(None, feeds)[0]
    for way, got in runs.items():
        error = np.abs(got.astype(np.float64) - want).max() / max(1.0, np.abs(want).max())
        assert error <= (4e-3 if dtype == np.float16 else 1e-5), f"{way}: relative error {error:.2e}"


def resnet_block(t_kind: str = "embedding", read_sum: bool = False, batch: int | str = 2):
    """conv(x) + t → GroupNorm(8)+SiLU, t the time embedding Gemm(temb) reshaped to [N, C, 1, 1]
    ("embedding"), a constant [1, C, 1, 1] ("constant") or a [1, C, 1, 1] input ("one_sample")."""
    g = G(opset=17, rng=np.random.default_rng(6))
    x = g.input([batch, 32, 8, 8], name="x", value=g.rng.standard_normal((2, 32, 8, 8)))
    h = g.conv(x, 32, 32, [3, 3], pads=[1, 1, 1, 1])
    if t_kind == "embedding":
        temb = g.input([batch, 16], name="temb", value=g.rng.standard_normal((2, 16)))
        t = g.op("Gemm", [temb, g.const(g.randn([32, 16])), g.const(g.randn([32]))], transB=1)
        t = g.op("Unsqueeze", [t, g.const(np.array([2, 3], np.int64))])
    elif t_kind == "constant":
        t = g.const(g.randn([1, 32, 1, 1]))
    else:
        t = g.input([1, 32, 1, 1], name="t")
    s = g.op("Add", [h, t])
    y = silu(g, affine(g, group_norm(g, s, 32, 8, 1e-5), g.randn([32, 1, 1]) + 1, g.randn([32, 1, 1])))
    g.op("Identity", [y], outputs=["y"])
    g.output("y")
    if read_sum:
        g.op("Relu", [s], outputs=["s_out"])
        g.output("s_out")
    return g.model(), g.feeds


@pytest.mark.parametrize("batch", [2, "N"])
def test_time_embedding_add_is_fused_and_runs_three_ways(batch):
    model, feeds = resnet_block(batch=batch)
    fused, report = normfold.fuse(model)
    assert custom_ops(fused) == ["BiasGroupNorm"] and count_op(fused, "Add") == 0
    assert [c.into for c in report.changes][-1] == "com.normfold.BiasGroupNorm"
    onnx.checker.check_model(fused, full_check=True)
    want = ort_run(model, feeds)[0]
    for way, session in four_ways(fused).items():
        np.testing.assert_allclose(session.run(None, feeds)[0], want, rtol=1e-4, atol=1e-5, err_msg=way)


@pytest.mark.parametrize("t_kind, read_sum", [("constant", False), ("one_sample", False), ("embedding", True)])
def test_adds_the_kernel_does_not_take_are_left(t_kind, read_sum):
    model, _ = resnet_block(t_kind, read_sum)
    fused, _ = normfold.fuse(model)
    assert custom_ops(fused) == ["GroupNorm"] and count_op(fused, "Add") == 1


def test_an_excluded_add_is_left_for_the_rollback():
    from normfold.passes.fuse.fuse_norms import fuse_norms
    from normfold.pipeline.api import run_pass

    model, _ = block("ln")
    add = next(n.name for n in model.graph.node if n.op_type == "Add" and list(n.output) == ["s"])
    fused, report = run_pass(model, fuse_norms, exclude=frozenset({add}))
    assert custom_ops(fused) == ["LayerNorm"] and count_op(fused, "Add") == 1
    assert all(c.node != add for c in report.changes)

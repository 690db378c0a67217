"""`normfold.fuse` on hand-built graphs: every spelling of every pattern fuses
into exactly one node whose result matches the unfused model (onnxruntime,
optimizations off) and a float64 reference; look-alikes are left alone and
reported with the reason.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import normfold
from tests.helpers.graphs import G, ort_run
from tests.helpers.norm_graphs import (
    SPELLINGS,
    affine,
    custom_nodes,
    group_norm,
    layer_norm,
    normalize,
    reduce_mean,
    ref_group_norm,
    ref_normalize,
    silu,
)
from normfold.runtime.session import make_session


def fuse(model: onnx.ModelProto, **options):
    """normfold.fuse, checking the input is untouched and the output valid."""
    before = model.SerializeToString()
    fused, report = normfold.fuse(model, **options)
    assert model.SerializeToString() == before, "fuse modified its input"
    onnx.checker.check_model(fused)
    return fused, report


def run_fused(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    session = make_session(model, threads=1)
    return session.run([o.name for o in model.graph.output], feeds)


def assert_matches(original, fused, feeds, reference=None, dtype=np.float32):
    """Fused outputs vs onnxruntime on the original model (optimizations off).

    With a float64 `reference` of the first output, the fused result must be
    within 1e-5 (fp32) / 4 fp16 steps (fp16) of it, or no further from it than
    the original model is (onnxruntime's own InstanceNormalization and
    decomposed subgraphs lose accuracy on inputs with large means)."""
    got, want = run_fused(fused, feeds), ort_run(original, feeds)
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == b.dtype
    fp16 = np.dtype(dtype) == np.float16
    if reference is None:
        for a, b in zip(got, want):
            tol = (16 * 2.0**-11 if fp16 else 2e-5) * max(1.0, float(np.abs(b.astype(np.float64)).max()))
            err = _err(a, b)
            assert err <= tol, f"fused vs unfused: {err:.3g} > {tol:.3g}"
        return
    tol = (4 * 2.0**-11 if fp16 else 1e-5) * max(1.0, float(np.abs(reference).max()))
    fused_err, original_err = _err(got[0], reference), _err(want[0], reference)
    assert fused_err <= max(tol, 1.5 * original_err), \
        f"fused model off the float64 reference by {fused_err:.3g} (tolerance {tol:.3g}; original model {original_err:.3g})"


def _err(a, b) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max()) if a.size else 0.0


def single_op(fused: onnx.ModelProto, op: str, domain="com.normfold") -> onnx.NodeProto:
    nodes = [n for n in fused.graph.node if n.op_type == op and n.domain == domain]
    assert len(nodes) == 1, [n.op_type for n in fused.graph.node]
    return nodes[0]


def attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


# ----------------------------------------------------------------- property test: moment norms

@st.composite
def moment_cases(draw):
    kind = draw(st.sampled_from(["ln_last", "ln_channel_first", "rms", "frn"]))
    rank = draw(st.integers(3, 5) if kind in ("ln_channel_first", "frn") else st.integers(2, 4))
    shape = [draw(st.integers(1, 3))] + [draw(st.integers(1, 7)) for _ in range(rank - 1)]
    if kind in ("ln_channel_first", "frn"):
        shape[1] = draw(st.integers(2, 6))
    if kind in ("ln_last", "rms"):
        k = draw(st.integers(1, rank - 1))
        axes = tuple(range(rank - k, rank))
        param_axes = axes
    elif kind == "ln_channel_first":
        axes = param_axes = (1,)
    else:
        axes, param_axes = tuple(range(2, rank)), (1,)
    return dict(
        kind=kind, shape=shape, axes=axes, param_axes=param_axes,
        eps=draw(st.sampled_from([1e-6, 1e-5, 1e-3, 0.5])),
        spelling=draw(st.sampled_from(SPELLINGS)), square=draw(st.sampled_from(["pow", "mul"])),
        eps_first=draw(st.booleans()), eps_node=draw(st.booleans()),
        scale=draw(st.booleans()), bias=draw(st.booleans()) and kind != "rms",
        scale_first=draw(st.booleans()), tlu=kind == "frn" and draw(st.booleans()),
        opset=draw(st.sampled_from([13, 17, 18])), dtype=draw(st.sampled_from([np.float32, np.float16])),
        offset=draw(st.sampled_from([0.0, 100.0])), seed=draw(st.integers(0, 2**16)),
    )


def param_shape(shape, param_axes, rank_style):
    """γ/β laid out as exporters do: [C,1,1] / [1,C,1,1] per channel, or the normalized dims."""
    if param_axes == (1,):
        trailing = len(shape) - 2
        return [shape[1]] + [1] * trailing if rank_style else [1, shape[1]] + [1] * trailing
    return [shape[a] for a in param_axes]


@given(moment_cases(), st.booleans())
@settings(max_examples=60)
def test_moment_norm_spellings_fuse_exactly(case, rank_style):
    g = G(dtype=case["dtype"], opset=case["opset"], rng=np.random.default_rng(case["seed"]))
    x = g.input(case["shape"], value=g.rng.standard_normal(case["shape"]) * 2 + case["offset"])
    kw = dict(spelling=case["spelling"], square=case["square"], eps_first=case["eps_first"], eps_node=case["eps_node"])
    centered = case["kind"].startswith("ln")
    y = layer_norm(g, x, case["axes"], case["eps"], **kw) if centered else normalize(g, x, case["axes"], case["eps"], **kw)
    pshape = param_shape(case["shape"], case["param_axes"], rank_style)
    scale = g.randn(pshape) if case["scale"] else None
    bias = g.randn(pshape) if case["bias"] else None
    y = affine(g, y, scale, bias, case["scale_first"])
    tau = None
    if case["tlu"]:
        tau = g.randn(pshape)
        y = g.op("Max", [y, g.const(tau)])
    g.output(y)
    model = g.model()

    fused, report = fuse(model, target="custom")

    kind = {"ln_last": "LayerNorm", "ln_channel_first": "LayerNorm", "rms": "RMSNorm", "frn": "FilterResponseNorm"}
    expected = {kind[case["kind"]]}
    if case["kind"] in ("rms", "frn") and case["axes"] == tuple(range(2, len(case["shape"]))) and not case["tlu"]:
        expected = {"RMSNorm", "FilterResponseNorm"}  # the same function: a mean square over the spatial axes
    assert len(fused.graph.node) == 1, [n.op_type for n in fused.graph.node]
    node = fused.graph.node[0]
    assert node.domain == "com.normfold" and node.op_type in expected, node.op_type
    assert not report.skipped
    assert attrs(node)["epsilon"] == pytest.approx(float(np.asarray(case["eps"], case["dtype"])), rel=1e-6)
    ref = ref_normalize(g.feeds[x], case["axes"], case["eps"], centered)
    full = lambda p: p.reshape([1] * (len(case["shape"]) - len(pshape)) + pshape)  # noqa: E731
    if scale is not None:
        ref = ref * full(scale.astype(case["dtype"]).astype(np.float64))
    if bias is not None:
        ref = ref + full(bias.astype(case["dtype"]).astype(np.float64))
    if tau is not None:
        ref = np.maximum(ref, full(tau.astype(case["dtype"]).astype(np.float64)))
    assert_matches(model, fused, g.feeds, ref, case["dtype"])


# ----------------------------------------------------------------- property test: GroupNorm

@given(st.integers(1, 3), st.sampled_from([1, 2, 4, 8]), st.integers(1, 4), st.integers(0, 3),
       st.sampled_from(["shape", "const"]), st.booleans(), st.booleans(), st.sampled_from([13, 17, 18]),
       st.sampled_from([np.float32, np.float16]), st.integers(0, 2**16))
@settings(max_examples=40)
def test_group_norm_fuses_exactly(n, groups, per_group, spatial_rank, shape_from, with_silu, in_params, opset,
                                  dtype, seed):
    g = G(dtype=dtype, opset=opset, rng=np.random.default_rng(seed))
    channels = groups * per_group
    shape = [n, channels] + [int(d) for d in g.rng.integers(1, 6, spatial_rank)]
    x = g.input(shape, value=g.rng.standard_normal(shape) + 50)
    in_scale = g.randn([groups]) if in_params else None
    in_bias = g.randn([groups]) if in_params else None
    y = group_norm(g, x, channels, groups, 1e-5, shape_from=shape_from, in_scale=in_scale, in_bias=in_bias)
    gamma, beta = g.randn([channels] + [1] * spatial_rank), g.randn([channels] + [1] * spatial_rank)
    y = affine(g, y, gamma, beta, scale_first=bool(seed % 2))
    if with_silu:
        y = silu(g, y)
    g.output(y, shape=shape)
    model = g.model()

    fused, report = fuse(model, target="custom")

    node = single_op(fused, "GroupNorm")
    assert len(fused.graph.node) == 1 and not report.skipped
    assert attrs(node)["num_groups"] == groups
    assert attrs(node)["activation"] == (b"silu" if with_silu else b"none")
    ref = ref_group_norm(g.feeds[x], groups, 1e-5)
    c = lambda v: v.astype(dtype).astype(np.float64).reshape([1, -1] + [1] * spatial_rank)  # noqa: E731
    if in_params:
        ref = ref * np.repeat(c(in_scale), per_group, axis=1) + np.repeat(c(in_bias), per_group, axis=1)
    ref = ref * c(gamma) + c(beta)
    if with_silu:
        ref = ref / (1 + np.exp(-ref))
    assert_matches(model, fused, g.feeds, ref, dtype)


# ----------------------------------------------------------------- targets

def ln_model(opset, shape=(2, 5, 8), axes=(2,)):
    g = G(opset=opset)
    x = g.input(list(shape))
    y = affine(g, layer_norm(g, x, axes, 1e-5), g.randn([shape[a] for a in axes]), g.randn([shape[a] for a in axes]))
    g.output(y)
    return g, g.model()


def rms_model(opset, shape=(2, 5, 8)):
    g = G(opset=opset)
    x = g.input(list(shape))
    g.output(affine(g, normalize(g, x, (len(shape) - 1,), 1e-6), g.randn([shape[-1]])))
    return g, g.model()


@pytest.mark.parametrize("opset, target, expected", [
    (13, "auto", ("LayerNorm", "com.normfold")),
    (17, "auto", ("LayerNormalization", "")),
    (17, "custom", ("LayerNorm", "com.normfold")),
    (17, "standard", ("LayerNormalization", "")),
    (18, "standard", ("LayerNormalization", "")),
])
def test_layer_norm_target(opset, target, expected):
    g, model = ln_model(opset)
    fused, _ = fuse(model, target=target)
    single_op(fused, *expected)
    assert len(fused.graph.node) == 1
    assert_matches(model, fused, g.feeds)


def test_standard_target_without_the_op_leaves_the_pattern_and_says_why():
    g, model = ln_model(13)
    fused, report = fuse(model, target="standard")
    assert len(fused.graph.node) == len(model.graph.node)
    assert any("opset 13 has no LayerNormalization (needs opset 17)" in s.reason for s in report.skipped)


@pytest.mark.parametrize("opset, target, expected", [
    (18, "auto", ("RMSNorm", "com.normfold")),
    (23, "auto", ("RMSNormalization", "")),
    (23, "standard", ("RMSNormalization", "")),
    (23, "custom", ("RMSNorm", "com.normfold")),
])
def test_rms_norm_target(opset, target, expected):
    g, model = rms_model(opset)
    fused, _ = fuse(model, target=target)
    single_op(fused, *expected)
    assert_matches(model, fused, g.feeds)


def test_group_norm_standard_target_keeps_silu_outside():
    g = G(opset=21)
    x = g.input([2, 8, 5, 5])
    y = silu(g, affine(g, group_norm(g, x, 8, 4, 1e-5), g.randn([8, 1, 1]), g.randn([8, 1, 1])))
    g.output(y)
    model = g.model()
    fused, _ = fuse(model, target="standard")
    assert sorted(n.op_type for n in fused.graph.node) == ["GroupNormalization", "Mul", "Sigmoid"]
    assert_matches(model, fused, g.feeds)
    fused, _ = fuse(model, target="auto")
    single_op(fused, "GroupNorm")
    assert len(fused.graph.node) == 1


@pytest.mark.parametrize("opset", [18, 21])
def test_standard_group_normalization_becomes_custom(opset):
    """GroupNormalization-18 (per-group scale, deprecated: the checker refuses it) and -21."""
    g = G(opset=opset)
    x = g.input([2, 6, 4, 3])
    size = 6 if opset >= 21 else 3
    y = g.op("GroupNormalization", [x, g.const(g.randn([size])), g.const(g.randn([size]))], num_groups=3,
             epsilon=1e-3)
    g.output(silu(g, y), shape=[2, 6, 4, 3])
    model = onnx.helper.make_model(g.graph(), opset_imports=[onnx.helper.make_opsetid("", opset)], ir_version=10)
    fused, report = normfold.fuse(model)
    node = single_op(fused, "GroupNorm")
    assert attrs(node)["activation"] == b"silu" and len(fused.graph.node) == 1
    assert_matches(model, fused, g.feeds)


def test_ops_filter():
    g = G(opset=17)
    x = g.input([2, 8, 4, 4])
    y = group_norm(g, x, 8, 2, 1e-5)
    y = layer_norm(g, y, (1,), 1e-6)
    g.output(y)
    model = g.model()
    fused, report = fuse(model, ops=["ln"], target="custom")
    assert [n.op_type for n in custom_nodes(fused)] == ["LayerNorm"]
    assert any(n.op_type == "InstanceNormalization" for n in fused.graph.node)
    fused, report = fuse(model, ops=["gn", "ln"], target="custom")
    assert sorted(n.op_type for n in custom_nodes(fused)) == ["GroupNorm", "LayerNorm"]
    assert_matches(model, fused, g.feeds)
    with pytest.raises(ValueError, match="unknown ops"):
        normfold.fuse(model, ops=["bn"])


# ----------------------------------------------------------------- look-alikes

def _look_alike(build, reason, opset=17):
    g = G(opset=opset)
    outputs = build(g)
    for out in outputs:
        g.output(out)
    model = g.model()
    fused, report = fuse(model, target="custom")
    assert not custom_nodes(fused), [n.op_type for n in fused.graph.node]
    assert any(reason in s.reason for s in report.skipped), [s.reason for s in report.skipped]
    assert_matches(model, fused, g.feeds)


def test_wrong_exponent_is_not_rms():
    def build(g):
        x = g.input([2, 3, 8])
        sq = g.op("Pow", [x, g.const(np.array(4.0))])
        shifted = g.op("Add", [reduce_mean(g, sq, (2,)), g.const(np.array(1e-5))])
        return [g.op("Div", [x, g.op("Sqrt", [shifted])])]
    _look_alike(build, "exponent of Pow")


def test_variance_over_other_axes_than_mean_is_not_layer_norm():
    def build(g):
        x = g.input([2, 3, 8])
        d = g.op("Sub", [x, reduce_mean(g, x, (1,))])
        return [normalize(g, d, (2,), 1e-5)]
    _look_alike(build, "reduce different axes")


def test_middle_axis_is_not_fused():
    def build(g):
        x = g.input([2, 3, 4, 5])
        return [layer_norm(g, x, (2,), 1e-5)]
    _look_alike(build, "no fused op normalizes over these axes")


def test_intermediate_used_elsewhere_is_not_fused():
    def build(g):
        x = g.input([2, 3, 8])
        d = g.op("Sub", [x, reduce_mean(g, x, (2,))])
        y = normalize(g, d, (2,), 1e-5)
        return [y, g.op("Relu", [d])]
    _look_alike(build, "is also read by")


def test_variance_as_graph_output_is_not_fused():
    def build(g):
        x = g.input([2, 3, 8])
        var = reduce_mean(g, g.op("Mul", [x, x]), (2,))
        y = g.op("Div", [x, g.op("Sqrt", [g.op("Add", [var, g.const(np.array(1e-5))])])])
        return [y, var]
    _look_alike(build, "is a graph output")


def test_runtime_epsilon_is_not_fused():
    def build(g):
        x, e = g.input([2, 3, 8]), g.input([1])
        var = reduce_mean(g, g.op("Pow", [x, g.const(np.array(2.0))]), (2,))
        return [g.op("Div", [x, g.op("Sqrt", [g.op("Add", [var, e])])])]
    _look_alike(build, "epsilon of Add")


def test_group_reshape_that_does_not_group_channels():
    def build(g):
        x = g.input([2, 6, 4])
        grouped = g.op("Reshape", [x, g.const(np.array([4, 3, -1], np.int64))])
        normed = g.op("InstanceNormalization", [grouped, g.const(np.ones(3)), g.const(np.zeros(3))])
        return [g.op("Reshape", [normed, g.op("Shape", [x])])]
    _look_alike(build, "does not group")


def test_keepdims_zero_is_not_fused():
    def build(g):
        x = g.input([2, 3, 8])
        var = g.op("ReduceMean", [g.op("Mul", [x, x])], axes=[2], keepdims=0)
        root = g.op("Sqrt", [g.op("Add", [var, g.const(np.array(1e-5))])])
        return [g.op("Div", [x, g.op("Unsqueeze", [root, g.const(np.array([2], np.int64))])])]
    _look_alike(build, "keepdims=0")


def test_runtime_scale_stays_after_the_fused_op_and_is_reported():
    g = G(opset=17)
    x, gamma = g.input([2, 4, 8]), g.input([8])
    y = g.op("Mul", [normalize(g, x, (2,), 1e-6), gamma])
    g.output(y)
    model = g.model()
    fused, report = fuse(model, target="custom")
    assert sorted(n.op_type for n in fused.graph.node) == ["Mul", "RMSNorm"]
    assert any("kept after the fused RMSNorm" in s.reason and "not a constant" in s.reason for s in report.skipped)
    assert_matches(model, fused, g.feeds)


def test_scale_varying_along_another_axis_is_not_absorbed():
    g = G(opset=17)
    x = g.input([2, 4, 8])
    y = affine(g, layer_norm(g, x, (2,), 1e-5), g.randn([4, 1]))
    g.output(y)
    model = g.model()
    fused, report = fuse(model, target="custom")
    assert sorted(n.op_type for n in fused.graph.node) == ["LayerNorm", "Mul"]
    assert any("varies along axis 1" in s.reason for s in report.skipped)
    assert_matches(model, fused, g.feeds)


# ----------------------------------------------------------------- structure

def test_subgraph_bodies_are_fused():
    body = G(opset=17, name="then")
    x_outer = "X"
    y = affine(body, layer_norm(body, x_outer, (2,), 1e-5), body.randn([6]), body.randn([6]))
    body.output(y, shape=[2, 3, 6])
    then_graph = onnx.helper.make_graph(body.nodes, "then", [], body.outputs, body.inits)
    g = G(opset=17)
    x = g.input([2, 3, 6], name="X")
    cond = g.input([], name="cond", dtype=np.bool_, value=np.array(True))
    out = g.op("If", [cond], then_branch=then_graph, else_branch=onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", [x], ["else_out"])], "else", [],
        [onnx.helper.make_tensor_value_info("else_out", onnx.TensorProto.FLOAT, [2, 3, 6])]))
    g.output(out, shape=[2, 3, 6])
    model = g.model()
    fused, report = fuse(model, target="custom")
    assert len(report.changes) == 1 and report.changes[0].graph == "then"
    assert_matches(model, fused, g.feeds)


def test_two_norms_in_sequence_and_shared_input():
    g = G(opset=17)
    x = g.input([2, 8, 6])
    a = affine(g, layer_norm(g, x, (2,), 1e-5), g.randn([6]), g.randn([6]))
    b = normalize(g, x, (2,), 1e-6)
    g.output(g.op("Add", [a, b]))
    model = g.model()
    fused, report = fuse(model, target="custom")
    assert sorted(n.op_type for n in custom_nodes(fused)) == ["LayerNorm", "RMSNorm"]
    assert_matches(model, fused, g.feeds)


# ----------------------------------------------------------------- weight norm / standardisation

def _weight_norm(g: G, v: str, gain: str, dim: int, rank: int, order: str) -> str:
    axes = [a for a in range(rank) if a != dim]
    norm = g.op("ReduceL2", [v], axes=axes, keepdims=1)
    if order == "v_div_norm_mul_g":
        return g.op("Mul", [g.op("Div", [v, norm]), gain])
    return g.op("Mul", [v, g.op("Div", [gain, norm])])


@pytest.mark.parametrize("order", ["v_div_norm_mul_g", "v_mul_g_div_norm"])
def test_constant_weight_norm_is_computed_offline(order):
    g = G(opset=17)
    x = g.input([2, 3, 7, 7])
    v, gain = g.randn([8, 3, 3, 3]), np.abs(g.randn([8, 1, 1, 1])) + 0.5
    w = _weight_norm(g, g.const(v), g.const(gain), 0, 4, order)
    g.output(g.op("Conv", [x, w, g.const(g.randn([8]))], kernel_shape=[3, 3]))
    model = g.model()
    fused, report = fuse(model)
    assert [n.op_type for n in fused.graph.node] == ["Conv"]
    assert [c.how for c in report.changes] == ["weight norm"]
    weight = next(onnx.numpy_helper.to_array(t) for t in fused.graph.initializer
                  if t.name == fused.graph.node[0].input[1])
    v32 = v.astype(np.float32).astype(np.float64)
    exact = gain.astype(np.float32) * v32 / np.sqrt((v32**2).sum(axis=(1, 2, 3), keepdims=True))
    assert np.abs(weight - exact).max() <= 1e-6 * np.abs(exact).max()
    assert_matches(model, fused, g.feeds)


def test_constant_weight_standardisation_is_computed_offline():
    g = G(opset=17)
    x = g.input([2, 3, 4])
    w = g.const(g.randn([5, 4]))
    d = g.op("Sub", [w, reduce_mean(g, w, (1,))])
    ws = g.op("Div", [d, g.op("Sqrt", [g.op("Add", [reduce_mean(g, g.op("Mul", [d, d]), (1,)),
                                                    g.const(np.array(1e-5))])])])
    g.output(g.op("MatMul", [x, g.op("Transpose", [ws], perm=[1, 0])]), shape=[2, 3, 5])
    model = g.model()
    fused, report = fuse(model)
    assert [n.op_type for n in fused.graph.node] == ["MatMul"]
    assert len(report.changes) == 1 and not custom_nodes(fused)
    assert_matches(model, fused, g.feeds)


@pytest.mark.parametrize("dim, order", [(0, "v_div_norm_mul_g"), (1, "v_mul_g_div_norm")])
def test_runtime_weight_norm_becomes_one_op(dim, order):
    g = G(opset=17)
    v = g.input([6, 5, 3])
    gain_shape = [1, 1, 1]
    gain_shape[dim] = [6, 5, 3][dim]
    gain = g.const(np.abs(g.randn(gain_shape)) + 0.5)
    g.output(_weight_norm(g, v, gain, dim, 3, order))
    model = g.model()
    fused, report = fuse(model)
    node = single_op(fused, "WeightNorm")
    assert attrs(node)["dim"] == dim and len(fused.graph.node) == 1
    assert_matches(model, fused, g.feeds)


def test_weight_norm_with_a_norm_over_two_kept_axes_is_left():
    g = G(opset=17)
    v = g.input([6, 5, 3])
    norm = g.op("ReduceL2", [v], axes=[2], keepdims=1)
    g.output(g.op("Mul", [g.op("Div", [v, norm]), g.const(np.ones([6, 5, 1]))]))
    model = g.model()
    fused, report = fuse(model)
    assert not custom_nodes(fused) and len(fused.graph.node) == 3


def test_grouping_reshape_with_allowzero_and_a_zero_is_not_group_norm():
    g = G(opset=17)
    x = g.input([2, 6, 4])
    grouped = g.op("Reshape", [x, g.const(np.array([0, 3, -1], np.int64))], allowzero=1)
    normed = g.op("InstanceNormalization", [grouped, g.const(np.ones(3)), g.const(np.zeros(3))])
    g.output(g.op("Reshape", [normed, g.op("Shape", [x])]), shape=[2, 6, 4])
    model = onnx.helper.make_model(g.graph(), opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=10)
    fused, report = normfold.fuse(model, target="custom")
    assert not custom_nodes(fused)
    assert any("does not group" in s.reason for s in report.skipped)


# --------------------------- fp16 LayerNorm centred in fp16, normalized in a wider type

def _centred_then_widened(g: G, x: str, wide=np.float64, back=onnx.TensorProto.FLOAT16) -> tuple[str, str]:
    """(x - mean, its normalization): x - mean in x's type, Cast to `wide`, the variance and
    division there, Cast to `back` (TorchScript's fp16 LayerNorm at opset 13)."""
    d = g.op("Sub", [x, reduce_mean(g, x, (2,))])
    up = g.op("Cast", [d], to=onnx.helper.np_dtype_to_tensor_dtype(np.dtype(wide)))
    sq = g.op("Pow", [up, g.const(np.array(2.0, wide), keep_dtype=True)])
    shifted = g.op("Add", [reduce_mean(g, sq, (2,)), g.const(np.array(1e-5, wide), keep_dtype=True)])
    return d, g.op("Cast", [g.op("Div", [up, g.op("Sqrt", [shifted])])], to=back)


@pytest.mark.parametrize("wide", [np.float32, np.float64])
def test_fp16_layer_norm_normalized_in_a_wider_type_is_one_layer_norm_of_x(wide):
    g = G(dtype=np.float16)
    x = g.input([2, 3, 8])
    _, y = _centred_then_widened(g, x, wide)
    g.output(affine(g, y, scale=g.randn([8]) + 1.5, bias=g.randn([8])))
    model = g.model()
    fused, _ = fuse(model, target="custom")
    node = single_op(fused, "LayerNorm")
    assert [n.op_type for n in fused.graph.node] == ["LayerNorm"] and node.input[0] == x
    assert attrs(node)["epsilon"] == pytest.approx(1e-5) and attrs(node)["axis"] == 2
    assert_matches(model, fused, g.feeds, dtype=np.float16)


def _not_a_layer_norm_of_x(model, feeds):
    fused, _ = fuse(model, target="custom")
    ops = [n.op_type for n in fused.graph.node]
    assert "LayerNorm" not in ops and "ReduceMean" in ops, ops
    assert_matches(model, fused, feeds, dtype=np.float16)


def test_fp16_centring_with_the_result_kept_wide_is_not_a_layer_norm_of_x():
    g = G(dtype=np.float16)
    _, y = _centred_then_widened(g, g.input([2, 3, 8]), back=onnx.TensorProto.FLOAT)
    g.output(y, dtype=np.float32)
    _not_a_layer_norm_of_x(g.model(), g.feeds)


def test_fp16_centring_read_elsewhere_is_not_a_layer_norm_of_x():
    g = G(dtype=np.float16)
    d, y = _centred_then_widened(g, g.input([2, 3, 8]))
    g.output(y)
    g.output(g.op("Relu", [d]))
    _not_a_layer_norm_of_x(g.model(), g.feeds)


def test_float32_centring_cast_to_double_is_not_a_low_precision_layer_norm():
    g = G(dtype=np.float32)
    _, y = _centred_then_widened(g, g.input([2, 3, 8]), back=onnx.TensorProto.FLOAT)
    g.output(y)
    fused, _ = fuse(g.model(), target="custom")
    assert "LayerNorm" not in [n.op_type for n in fused.graph.node]
    assert_matches(g.model(), fused, g.feeds)

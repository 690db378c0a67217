"""The rules `normfold.fold_affine` never breaks: what it must refuse (with a
reason), where a chain stops, shared weights, dtypes, options. Every result is
checked against onnxruntime on the unmodified model."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto

from tests.helpers.graphs import G, assert_same_outputs, changes_for, count_op, ort_run, skips_for
from tests.test_fold_affine_property import affine_fold
from tests.test_fold_bn_property import _retype


def conv_out(g: G, c=4, pads=(1, 1, 1, 1), **kw):
    x = g.input([2, 3, 5, 5])
    return g.conv(x, 3, c, [3, 3], pads=list(pads), **kw)


def step(g: G, op: str, x: str, values, name: str | None = None, first: bool = False) -> str:
    c = g.const(np.asarray(values, dtype=np.float64))
    return g.op(op, [c, x] if first else [x, c], name=name)


def assert_kept(report, node: str, *concepts: str) -> str:
    """`node` was not changed and is skipped once with a reason naming one of `concepts`."""
    assert not changes_for(report, node), report.changes
    [skip] = skips_for(report, node)
    assert any(c in skip.reason.lower() for c in concepts), skip.reason
    return skip.reason


# ------------------------------------------------------------ refusals
@pytest.mark.parametrize("shape, concepts", [
    ([1, 4, 5, 1], ("per channel",)),  # two non-1 axes
    ([5], ("axis",)),  # one value per column W, not per channel
    ([1, 1, 4, 1, 1], ("higher rank",)),  # would broadcast the 4-D output to 5-D
])
def test_constant_that_is_not_per_channel_is_refused(shape, concepts):
    g = G(rng=np.random.default_rng(1))
    y = step(g, "Mul", conv_out(g), g.randn(shape) + 2, name="scale")
    g.output(g.op("Relu", [y]))
    model = g.model()
    folded, report = affine_fold(model)
    assert_kept(report, "scale", *concepts)
    assert count_op(folded, "Mul") == 1
    assert_same_outputs(model, folded, g.feeds)


def test_division_by_a_constant_with_a_zero_is_refused():
    g = G()
    y = step(g, "Div", conv_out(g), np.reshape([1.0, 0.0, 2.0, 3.0], (4, 1, 1)), name="div")
    g.output(g.op("Relu", [y]))
    model = g.model()
    folded, report = affine_fold(model)
    assert_kept(report, "div", "zero")
    assert count_op(folded, "Div") == 1


@pytest.mark.parametrize("op", ["Div", "Mul"])
def test_constant_over_x_and_products_of_tensors_are_not_steps(op):
    """c / x is not affine in x; x * y of two tensors is not a constant step: not candidates."""
    g = G()
    y = conv_out(g)
    other = g.input([2, 4, 5, 5]) if op == "Mul" else None
    z = g.op(op, [y, other] if other else [g.const(np.full([4, 1, 1], 2.0)), y], name="node")
    g.output(z)
    model = g.model()
    folded, report = affine_fold(model)
    assert not report.changes and not report.skipped
    assert count_op(folded, op) == 1


def test_shared_weight_is_copied_never_changed():
    """Two convs read the same weight and bias; a chain follows one of them only."""
    g = G(rng=np.random.default_rng(3))
    w, b = g.const(g.randn([4, 3, 3, 3])), g.const(g.randn([4]))
    x1, x2 = g.input([1, 3, 5, 5]), g.input([1, 3, 5, 5])
    y1 = g.conv(x1, 3, 4, [3, 3], weight=w, b=b, pads=[1, 1, 1, 1])
    y1 = step(g, "Add", step(g, "Mul", y1, g.randn([4, 1, 1]), name="mul"), g.randn([4, 1, 1]), name="add")
    g.output(y1)
    g.output(g.conv(x2, 3, 4, [3, 3], weight=w, b=b, pads=[1, 1, 1, 1]))
    model = g.model()
    folded, report = affine_fold(model)
    assert [c.how for c in report.changes] == ["backward", "backward"]
    refs = assert_same_outputs(model, folded, g.feeds)
    assert np.array_equal(ort_run(folded, g.feeds)[1], refs[1])  # bit-identical


@pytest.mark.parametrize("where", ["graph output", "other reader"])
def test_chain_stops_at_an_intermediate_seen_elsewhere(where):
    """conv -> Mul -> t -> Add: t is a graph output or read by a Relu too. The
    Mul folds (t is then the conv's output, same value); the Add cannot fold
    backward, and its Relu consumer is no layer."""
    g = G(rng=np.random.default_rng(4))
    t = step(g, "Mul", conv_out(g), g.randn([4, 1, 1]), name="mul")
    y = step(g, "Add", t, g.randn([4, 1, 1]), name="add")
    g.output(g.op("Relu", [y]))
    g.output(t if where == "graph output" else g.op("Relu", [t]))
    model = g.model()
    folded, report = affine_fold(model)
    assert [(c.node, c.how) for c in report.changes] == [("mul", "backward")]
    assert_kept(report, "add", "graph output" if where == "graph output" else "elsewhere")
    assert_same_outputs(model, folded, g.feeds)


def test_chain_output_that_is_a_graph_output_is_not_folded_forward():
    g = G()
    x = g.input([1, 3, 4, 4])
    h = step(g, "Mul", x, np.reshape([1.0, 2.0, 3.0], (3, 1, 1)), name="mul")
    g.output(g.conv(h, 3, 2, [1, 1]))
    g.output(h)
    model = g.model()
    folded, report = affine_fold(model)
    assert_kept(report, "mul", "graph output")
    assert_same_outputs(model, folded, g.feeds)


def test_steps_on_different_axes_split_the_chain():
    """Mul per channel folds into the conv; the next Mul (per column W) is left, with the reason."""
    g = G(rng=np.random.default_rng(5))
    y = step(g, "Mul", conv_out(g), g.randn([4, 1, 1]), name="per_channel")
    y = step(g, "Mul", y, g.randn([5]), name="per_column")
    g.output(g.op("Relu", [y]))
    model = g.model()
    folded, report = affine_fold(model)
    assert [(c.node, c.into) for c in report.changes] == [("per_channel", "Conv")]
    assert_kept(report, "per_column", "axis")
    assert_same_outputs(model, folded, g.feeds)


def test_a_step_that_composes_with_nothing_leaves_the_rest_of_the_chain_foldable():
    """conv -> Mul per channel -> Mul per column -> Mul per channel -> 1x1 conv:
    the first folds backward, the last forward, the middle one is left."""
    g = G(rng=np.random.default_rng(13))
    y = step(g, "Mul", conv_out(g), g.randn([4, 1, 1]), name="first")
    y = step(g, "Mul", y, g.randn([5]), name="per_column")
    y = step(g, "Mul", y, g.randn([4, 1, 1]), name="last")
    g.output(g.conv(y, 4, 2, [1, 1]))
    model = g.model()
    folded, report = affine_fold(model)
    assert [(c.node, c.how) for c in report.changes] == [("first", "backward"), ("last", "forward")]
    assert_kept(report, "per_column", "axis")
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Mul", "Conv"]
    assert_same_outputs(model, folded, g.feeds)


def test_gelu_factor_is_left_for_onnxruntimes_gelu_fusion():
    """x·(1 + erf(x/√2))·0.5 -> MatMul: folding the 0.5 into the MatMul would be
    exact, but onnxruntime then no longer fuses the GELU (slower)."""
    g = G(rng=np.random.default_rng(14))
    x = g.input([2, 4])
    h = g.op("MatMul", [x, g.const(g.randn([4, 6]))])
    erf = g.op("Erf", [step(g, "Div", h, 1.4142135)])
    h = g.op("Mul", [h, step(g, "Add", erf, 1.0)])
    h = step(g, "Mul", h, 0.5, name="half")
    g.output(g.op("MatMul", [h, g.const(g.randn([6, 3]))]))
    model = g.model()
    folded, report = affine_fold(model)
    assert_kept(report, "half", "gelu")
    assert count_op(folded, "Mul") == 2
    assert_same_outputs(model, folded, g.feeds)


def test_partial_fold_refused_where_the_scale_is_zero_and_the_shift_not():
    g = G(rng=np.random.default_rng(6))
    x = g.input([1, 3, 5, 5])
    h = step(g, "Add", step(g, "Mul", x, np.reshape([1.0, 0.0, 2.0], (3, 1, 1)), name="mul"), np.ones((3, 1, 1)),
             name="add")
    g.output(g.conv(h, 3, 2, [3, 3], pads=[1, 1, 1, 1]))
    model = g.model()
    folded, report = affine_fold(model)
    assert_kept(report, "mul", "zero")
    assert_kept(report, "add", "zero")
    assert_same_outputs(model, folded, g.feeds)


def test_lone_shift_before_a_padded_conv_is_kept():
    """Nothing to gain: the Add would stay an Add."""
    g = G()
    x = g.input([1, 3, 5, 5])
    h = step(g, "Sub", x, np.reshape([0.5, 0.4, 0.3], (3, 1, 1)), name="sub")
    g.output(g.conv(h, 3, 2, [3, 3], pads=[1, 1, 1, 1]))
    model = g.model()
    folded, report = affine_fold(model)
    assert_kept(report, "sub", "pad")
    assert count_op(folded, "Sub") == 1


def test_min_max_scaling_then_padded_conv_keeps_one_add():
    """(x - min) / (max - min) * 2 - 1 before a padded conv: the scale goes into
    the weight, the shift stays as one Add."""
    g = G(rng=np.random.default_rng(7))
    x = g.input([2, 3, 6, 6])
    lo, hi = np.array([0.1, -0.2, 0.3]), np.array([1.5, 2.0, 0.9])
    h = step(g, "Sub", x, lo.reshape(3, 1, 1))
    h = step(g, "Div", h, (hi - lo).reshape(3, 1, 1))
    h = step(g, "Sub", step(g, "Mul", h, 2.0), 1.0)
    g.output(g.conv(h, 3, 4, [3, 3], pads=[1, 1, 1, 1]))
    model = g.model()
    folded, report = affine_fold(model)
    assert report.counts() == {"Conv (partial)": 4}
    assert [n.op_type for n in folded.graph.node] == ["Add", "Conv"]
    assert_same_outputs(model, folded, g.feeds)


# ------------------------------------------------------------ what still folds
def test_bn_inside_a_chain_folds_with_it():
    g = G(rng=np.random.default_rng(8))
    y, bn = g.bn(step(g, "Mul", conv_out(g), g.randn([4, 1, 1]), name="mul"), 4)
    y = step(g, "Add", y, g.randn([4, 1, 1]), name="add", first=True)
    g.output(g.op("Relu", [y]))
    model = g.model()
    folded, report = affine_fold(model)
    assert [(c.node, c.op) for c in report.changes] == [("mul", "Mul"), (bn, "BatchNormalization"), ("add", "Add")]
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Relu"]
    assert_same_outputs(model, folded, g.feeds)


def test_chain_in_if_branches_is_folded():
    from onnx import helper

    rng = np.random.default_rng(9)
    outer = G(rng=rng)
    x = outer.input([1, 3, 5, 5])
    cond = outer.input([], dtype=np.bool_, value=np.array(True))
    branches = []
    for name in ("then", "else"):
        b = G(name=name, rng=rng)
        y = step(b, "Mul", b.conv(x, 3, 4, [3, 3]), b.randn([4, 1, 1]))
        b.output(y, shape=[1, 4, 3, 3])
        branches.append(b.graph())
    outer.nodes.append(helper.make_node("If", [cond], ["y"], then_branch=branches[0], else_branch=branches[1]))
    outer.output("y", shape=[1, 4, 3, 3])
    model = outer.model()
    folded, report = affine_fold(model)
    assert sorted(c.graph for c in report.changes) == ["else", "then"]
    assert count_op(folded, "Mul") == 0
    for value in (True, False):
        assert_same_outputs(model, folded, {**outer.feeds, cond: np.array(value)})


def test_direction_option():
    g = G(rng=np.random.default_rng(10))
    y = step(g, "Mul", conv_out(g), g.randn([4, 1, 1]), name="mul")
    g.output(g.conv(y, 4, 2, [1, 1]))
    model = g.model()
    for direction in ("backward", "forward"):
        folded, report = affine_fold(model, direction=direction)
        assert [c.how for c in report.changes] == [direction]
        assert_same_outputs(model, folded, g.feeds)
    with pytest.raises(ValueError, match="direction"):
        affine_fold(model, direction="sideways")


def test_bf16_model_folds_and_stays_bf16():
    g = G(rng=np.random.default_rng(11))
    x = g.input([3, 4])
    y = g.op("Gemm", [x, g.const(g.randn([5, 4])), g.const(g.randn([5]))], transB=1)
    g.output(step(g, "Mul", step(g, "Sub", y, g.randn([5])), g.randn([5])))
    bf16 = _retype(g.model(), TensorProto.FLOAT, TensorProto.BFLOAT16)
    folded, report = affine_fold(bf16)
    assert report.counts() == {"Gemm (backward)": 2}
    assert {t.data_type for t in folded.graph.initializer} == {TensorProto.BFLOAT16}
    [ref] = ort_run(_retype(bf16, TensorProto.BFLOAT16, TensorProto.FLOAT), g.feeds)
    [got] = ort_run(_retype(folded, TensorProto.BFLOAT16, TensorProto.FLOAT), g.feeds)
    assert np.max(np.abs(got - ref)) <= 16 * 2.0**-8 * max(1.0, float(np.abs(ref).max()))


def test_layer_of_an_enclosing_graph_is_not_folded_into():
    """The conv is in the main graph, the Mul reading its output inside an If
    branch: the branch must not rewire the main graph's conv."""
    from onnx import helper

    rng = np.random.default_rng(12)
    outer = G(rng=rng)
    y = conv_out(outer)
    other = outer.input([2, 4, 5, 5])
    cond = outer.input([], dtype=np.bool_, value=np.array(True))
    branches = []
    for name, read in (("then", y), ("else", other)):  # only the then branch reads the conv
        b = G(name=name, rng=rng)
        b.output(step(b, "Mul", read, b.randn([4, 1, 1]), name=f"{name}_mul"), shape=[2, 4, 5, 5])
        branches.append(b.graph())
    outer.nodes.append(helper.make_node("If", [cond], ["out"], then_branch=branches[0], else_branch=branches[1]))
    outer.output("out", shape=[2, 4, 5, 5])
    model = outer.model()
    folded, report = affine_fold(model)
    assert not report.changes
    assert_kept(report, "then_mul", "enclosing")
    for value in (True, False):
        assert_same_outputs(model, folded, {**outer.feeds, cond: np.array(value)})


@pytest.mark.parametrize("zero_shift", [True, False])
def test_fold_bn_folds_a_shift_free_bn_into_a_following_conv_transpose(zero_shift):
    """fold-bn uses the same core: a BN with t = 0 before a ConvTranspose folds
    forward; with a shift it is kept (fold-affine then folds its scale)."""
    from tests.helpers.graphs import bn_params, fold

    g = G(rng=np.random.default_rng(15))
    x = g.input([1, 4, 3, 3])
    h, bn = g.bn(x, 4, params=bn_params(g.rng, 4, zero_shift=zero_shift))
    g.output(g.conv_transpose(h, 4, 6, [3, 3], group=2, strides=[2, 2], pads=[1, 1, 1, 1]))
    model = g.model()
    folded, report = fold(model)
    assert count_op(folded, "BatchNormalization") == (0 if zero_shift else 1)
    assert [c.how for c in report.changes] == (["forward"] if zero_shift else [])
    assert_same_outputs(model, folded, g.feeds)
    if not zero_shift:
        folded, report = affine_fold(model)
        assert [c.how for c in report.changes] == ["partial"]
        assert [n.op_type for n in folded.graph.node] == ["Add", "ConvTranspose"]
        assert_same_outputs(model, folded, g.feeds)

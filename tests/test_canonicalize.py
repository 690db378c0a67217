"""The canonical-form pass (normfold.passes.canonicalize): constant subgraphs are folded
exactly, no-ops dropped, and nothing else changes. Reference: onnxruntime on the
unmodified model with its optimizations off (tests.helpers.graphs)."""

from __future__ import annotations

import numpy as np
import onnx
from hypothesis import given
from hypothesis import strategies as st

import normfold
from normfold.passes.canonicalize import FOLD_BYTES, canonicalize
from tests.helpers.graphs import G, assert_same_outputs, count_op, ort_run

SHAPE = [4, 6]
# (op, builder) of shape-preserving steps over a constant [4, 6] tensor
STEPS = {
    "add": lambda g, t: g.op("Add", [t, g.const(g.randn(SHAPE))]),
    "mul": lambda g, t: g.op("Mul", [g.const(g.randn([6])), t]),
    "sqrt": lambda g, t: g.op("Sqrt", [g.op("Add", [g.op("Abs", [t]), g.const(np.ones(1))])]),
    "div": lambda g, t: g.op("Div", [t, g.const(np.full(SHAPE, 3.0))]),
    "tanh": lambda g, t: g.op("Tanh", [t]),
    "reshape": lambda g, t: g.op("Reshape", [g.op("Reshape", [t, g.const(np.array([24]))]),
                                              g.const(np.array(SHAPE))]),
    "transpose": lambda g, t: g.op("Transpose", [g.op("Transpose", [t], perm=[1, 0])], perm=[1, 0]),
    "mean": lambda g, t: g.op("Sub", [t, g.op("ReduceMean", [t], axes=[1], keepdims=1)]),
    "cast": lambda g, t: g.op("Cast", [g.op("Cast", [t], to=onnx.TensorProto.DOUBLE)], to=onnx.TensorProto.FLOAT),
}


def _canonical(model):
    before = model.SerializeToString()
    result, report = normfold.run_pass(model, canonicalize)
    assert model.SerializeToString() == before, "canonicalize modified its input"
    onnx.checker.check_model(result)
    return result, report


@given(st.lists(st.sampled_from(sorted(STEPS)), min_size=1, max_size=6), st.integers(0, 2**16))
def test_any_constant_chain_folds_into_one_initializer_and_computes_the_same(steps, seed):
    g = G(opset=13, rng=np.random.default_rng(seed))
    x = g.input([2, *SHAPE])
    w = g.const(g.randn(SHAPE))
    for step in steps:
        w = STEPS[step](g, w)
    g.output(g.op("Mul", [x, w], outputs=["y"]))
    model = g.model()
    result, report = _canonical(model)
    assert [n.op_type for n in result.graph.node] == ["Mul"]
    assert report.changes
    assert_same_outputs(model, result, g.feeds)


def _weight_standardised_conv(opset: int):
    """Conv over BatchNormalization(w.reshape(1, O, -1)) in training mode, as torch
    exports timm's StdConv2d: five outputs below opset 14, training_mode=1 from 14."""
    g = G(opset=opset)
    x = g.input([1, 3, 5, 5])
    weight = g.randn([4, 3, 3, 3], 0.2) + 0.1
    flat = g.op("Reshape", [g.const(weight), g.const(np.array([1, 4, -1]))])
    params = [g.const(np.ones(4)), g.const(np.zeros(4)), g.const(np.zeros(4)), g.const(np.ones(4))]
    extra = {"training_mode": 1} if opset >= 14 else {}
    outs = g.op("BatchNormalization", [flat, *params], n_out=3 if opset >= 14 else 5, epsilon=1e-6, momentum=1.0,
                **extra)
    standardised = g.op("Reshape", [outs[0], g.const(np.array([4, 3, 3, 3]))])
    g.output(g.op("Conv", [x, standardised], kernel_shape=[3, 3], outputs=["y"]))
    flat_w = weight.reshape(4, -1)
    expected = (flat_w - flat_w.mean(1, keepdims=True)) / np.sqrt(flat_w.var(1, keepdims=True) + 1e-6)
    return g, expected.reshape(weight.shape)


def test_batch_norm_over_a_weight_in_training_mode_is_the_standardised_weight():
    for opset in (13, 15):
        g, expected = _weight_standardised_conv(opset)
        model = g.model()
        result, _ = _canonical(model)
        assert [n.op_type for n in result.graph.node] == ["Conv"]
        folded = onnx.numpy_helper.to_array(next(i for i in result.graph.initializer
                                                 if i.name == result.graph.node[0].input[1]))
        np.testing.assert_allclose(folded, expected, rtol=1e-6, atol=1e-7)
        assert_same_outputs(model, result, g.feeds)


def test_scalar_constants_keep_their_rank():
    """0-d results (Mod, Sub of shape arithmetic) stay 0-d, so Unsqueeze→Concat still
    sees rank 1 (a Swin window-shift export)."""
    g = G(opset=13)
    x = g.input([2, 12])
    s = g.op("Sub", [g.const(np.array(16)), g.op("Mod", [g.const(np.array(16)), g.const(np.array(4))])])
    dims = [g.op("Unsqueeze", [t, g.const(np.array([0]))]) for t in (g.const(np.array(2)), s)]
    target = g.op("Concat", [dims[0], g.const(np.array([-1]))], axis=0)
    g.output(g.op("Reshape", [x, target], outputs=["y"]), shape=[2, 12])
    g.output(g.op("Add", [g.op("Cast", [dims[1]], to=onnx.TensorProto.FLOAT), x], outputs=["z"]), shape=[2, 12])
    model = g.model()
    result, _ = _canonical(model)
    assert count_op(result, "Mod") == 0 and count_op(result, "Concat") == 0
    assert_same_outputs(model, result, g.feeds)


def test_shape_of_a_static_tensor_folds_and_makes_the_reshape_target_constant():
    g = G(opset=13)
    x = g.input([2, 3, 4])
    h = g.op("Relu", [x])
    shape = g.op("Shape", [h])
    first = g.op("Gather", [shape, g.const(np.array([0]))], axis=0)
    g.output(g.op("Reshape", [h, g.op("Concat", [first, g.const(np.array([-1]))], axis=0)], outputs=["y"]),
             shape=[2, 12])
    model = g.model()
    result, _ = _canonical(model)
    assert [n.op_type for n in result.graph.node] == ["Relu", "Reshape"]
    assert_same_outputs(model, result, g.feeds)


def test_a_result_that_would_outgrow_its_inputs_stays_and_says_why():
    g = G(opset=13)
    x = g.input([1])
    side = int(np.sqrt(FOLD_BYTES)) + 1  # float32: 4 * side² bytes > FOLD_BYTES
    big = g.op("Expand", [g.const(np.ones(1)), g.const(np.array([side, side]))])
    g.output(g.op("Add", [x, big], outputs=["y"]))
    model = g.model()
    result, report = _canonical(model)
    assert count_op(result, "Expand") == 1
    assert any("outgrow" in s.reason for s in report.skipped)


def test_quantization_random_ops_and_graph_outputs_are_left_alone():
    g = G(opset=13)
    x = g.input([2, 4])
    dq = g.op("DequantizeLinear", [g.const(np.arange(8, dtype=np.int8).reshape(2, 4)), g.const(np.array(0.1)),
                                   g.const(np.array(0, dtype=np.int8))])
    g.output(g.op("Add", [x, dq], outputs=["y"]))
    g.output(g.op("Neg", [g.const(np.ones(2))], outputs=["k"]), shape=[2])
    model = g.model()
    result, _ = _canonical(model)
    assert count_op(result, "DequantizeLinear") == 1 and count_op(result, "Neg") == 1
    assert_same_outputs(model, result, g.feeds)


def test_no_op_casts_go_and_real_casts_stay():
    g = G(opset=13)
    x = g.input([2, 4])
    same = g.op("Cast", [g.op("Relu", [x])], to=onnx.TensorProto.FLOAT)
    down = g.op("Cast", [same], to=onnx.TensorProto.FLOAT16)
    g.output(g.op("Cast", [down], to=onnx.TensorProto.FLOAT, outputs=["y"]))
    model = g.model()
    result, _ = _canonical(model)
    assert [n.op_type for n in result.graph.node] == ["Relu", "Cast", "Cast"]
    np.testing.assert_array_equal(ort_run(result, g.feeds)[0], ort_run(model, g.feeds)[0])

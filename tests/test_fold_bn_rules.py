"""Safety rules of `normfold.fold_bn` (issue 2, NORMS.md): what must be kept
(with a reason), what must still fold although it looks unusual, subgraphs,
direction/standalone options, and what the output model must look like."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.helpers.graphs import (
    G,
    all_nodes,
    assert_same_outputs,
    bn_params,
    changes_for,
    count_op,
    fold,
    initializer_names,
    ort_run,
    skips_for,
    used_names,
)


def assert_kept(model, folded, report, bn: str, *concepts: str):
    """`bn` is still in the folded model, not reported as changed, reported as
    skipped once with a non-empty reason mentioning one of `concepts`."""
    assert bn in [n.name for n in all_nodes(folded.graph) if n.op_type == "BatchNormalization"], \
        f"{bn} was removed; report: {report.changes}"
    assert not changes_for(report, bn), f"{bn} reported as changed: {changes_for(report, bn)}"
    skips = skips_for(report, bn)
    assert len(skips) == 1, f"expected one skip for {bn}, got {report.skipped}"
    reason = skips[0].reason
    assert isinstance(reason, str) and reason.strip(), "empty skip reason"
    assert skips[0].op == "BatchNormalization"
    if concepts:
        assert any(c in reason.lower() for c in concepts), f"reason {reason!r} mentions none of {concepts}"
    return reason


def bn_params_of(model, bn: str):
    node = next(n for n in all_nodes(model.graph) if n.name == bn)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return [inits.get(name) for name in node.input[1:5]]


def conv_bn(g: G, c_in=3, c_out=4, **bn_kw):
    x = g.input([2, c_in, 5, 5])
    y = g.conv(x, c_in, c_out, [3, 3], pads=[1, 1, 1, 1])
    out, bn = g.bn(y, c_out, **bn_kw)
    return x, y, out, bn


# ------------------------------------------------------------ kept + reason
def test_producer_output_with_another_consumer_is_kept():
    g = G()
    _, y, out, bn = conv_bn(g)
    g.output(out)
    g.output(g.op("Relu", [y]))
    model = g.model()
    folded, report = fold(model)
    assert_kept(model, folded, report, bn, "consum", "used", "other", "fan", "shared")
    assert_same_outputs(model, folded, g.feeds)


def test_producer_output_that_is_a_graph_output_is_kept():
    g = G()
    _, y, out, bn = conv_bn(g)
    g.output(out)
    g.output(y)
    model = g.model()
    folded, report = fold(model)
    assert_kept(model, folded, report, bn, "output")
    assert_same_outputs(model, folded, g.feeds)


def test_bn_output_that_is_a_graph_output_is_not_folded_forward():
    """BN on the input feeding an unpadded conv, but BN's output is observable."""
    g = G()
    x = g.input([1, 3, 4, 4])
    h, bn = g.bn(x, 3)
    g.output(g.conv(h, 3, 2, [1, 1]))
    g.output(h)
    model = g.model()
    folded, report = fold(model)
    assert_kept(model, folded, report, bn, "output")
    assert_same_outputs(model, folded, g.feeds)


def test_bn_output_with_an_unfoldable_consumer_is_not_folded_forward():
    g = G()
    x = g.input([1, 3, 4, 4])
    h, bn = g.bn(x, 3)
    g.output(g.conv(h, 3, 2, [1, 1]))
    g.output(g.op("Relu", [h]))
    model = g.model()
    folded, report = fold(model)
    assert_kept(model, folded, report, bn)
    assert_same_outputs(model, folded, g.feeds)


@pytest.mark.parametrize("which", ["mean", "var", "scale", "bias"])
def test_bn_param_that_is_a_graph_input_is_kept(which):
    g = G()
    x = g.input([2, 3, 5, 5])
    y = g.conv(x, 3, 4, [3, 3], pads=[1, 1, 1, 1])
    p = dict(zip(("scale", "bias", "mean", "var"), bn_params(g.rng, 4)))
    names = [g.input([4], value=np.abs(p[k]) + 0.5 if k == "var" else p[k]) if k == which else g.const(p[k])
             for k in ("scale", "bias", "mean", "var")]
    out, bn = g.bn(y, 4, param_names=names)
    g.output(out)
    model = g.model()
    folded, report = fold(model)
    assert_kept(model, folded, report, bn, "constant", "input")
    assert_same_outputs(model, folded, g.feeds)


def test_conv_weight_that_is_a_graph_input_is_not_folded_into():
    g = G()
    x = g.input([2, 3, 5, 5])
    w = g.input([4, 3, 3, 3])
    y = g.conv(x, 3, 4, [3, 3], weight=w, pads=[1, 1, 1, 1])
    out, bn = g.bn(y, 4)
    g.output(out)
    model = g.model()
    folded, report = fold(model)
    assert_kept(model, folded, report, bn, "constant", "input", "weight")
    assert_same_outputs(model, folded, g.feeds)


@pytest.mark.parametrize("extra_outputs", ["named", "empty names"])
def test_training_mode_bn_is_kept(extra_outputs):
    g = G(opset=15)
    x = g.input([4, 3, 5, 5])
    y = g.conv(x, 3, 3, [3, 3], pads=[1, 1, 1, 1])
    p = [g.const(a) for a in bn_params(g.rng, 3)]
    outs = ["bn_y", "bn_rm", "bn_rv"] if extra_outputs == "named" else ["bn_y", "", ""]
    g.nodes.append(helper.make_node("BatchNormalization", [y, *p], outs, name="train_bn", training_mode=1,
                                    momentum=0.9))
    g.output("bn_y", shape=[4, 3, 5, 5])
    if extra_outputs == "named":
        g.output("bn_rm", shape=[3])
        g.output("bn_rv", shape=[3])
    model = g.model()
    folded, report = fold(model)
    assert_kept(model, folded, report, "train_bn", "train")
    if extra_outputs == "named":  # onnxruntime 1.31 crashes (SIGSEGV) on the empty-name form itself
        assert_same_outputs(model, folded, g.feeds)


@pytest.mark.parametrize("bad", ["var+eps<0", "var+eps=0", "nan mean", "inf gamma", "nan var", "inf beta"])
def test_invalid_bn_params_are_kept_not_folded_into_garbage(bad):
    g = G()
    c = 4
    gamma, beta, mean, var = (a.copy() for a in bn_params(g.rng, c))
    eps = 1e-5
    if bad == "var+eps<0":
        var[1] = -1.0
    elif bad == "var+eps=0":
        var[2] = -np.float64(np.float32(eps))  # exactly -eps after the fp32 round trip
    elif bad == "nan mean":
        mean[0] = np.nan
    elif bad == "inf gamma":
        gamma[3] = np.inf
    elif bad == "nan var":
        var[0] = np.nan
    else:
        beta[1] = -np.inf
    x = g.input([2, 3, 5, 5])
    y = g.conv(x, 3, c, [3, 3], pads=[1, 1, 1, 1])
    out, bn = g.bn(y, c, eps=eps, params=(gamma, beta, mean, var))
    g.output(out)
    model = g.model()
    folded, report = fold(model)
    assert_kept(model, folded, report, bn, "var", "eps", "positive", "negative", "zero", "nan", "inf", "finite",
                "invalid")
    # the parameters and the conv weight are carried over bit for bit
    for before, after in zip(bn_params_of(model, bn), bn_params_of(folded, bn)):
        assert after is not None and np.array_equal(before, after, equal_nan=True)


@pytest.mark.parametrize("t_equals_n", [True, False])
def test_matmul_3d_with_bn_on_axis_1_is_not_folded_backward(t_equals_n):
    """[B, T, K] @ [K, N] -> [B, T, N]; BN on axis 1 normalises T, not N.
    With T == N the shapes even line up: a fold into W would be silently wrong."""
    b, t, k = 2, 4, 3
    n = t if t_equals_n else 5
    g = G()
    x = g.input([b, t, k])
    y = g.op("MatMul", [x, g.const(g.randn([k, n]))])
    y = g.op("Add", [y, g.const(g.randn([n]))])
    out, bn = g.bn(y, t)
    g.output(out)
    model = g.model()
    folded, report = fold(model)
    assert_kept(model, folded, report, bn, "axis", "rank", "3-d", "2-d", "dimension", "last", "channel", "d ")
    assert_same_outputs(model, folded, g.feeds)


def test_bn_on_3d_tensor_then_matmul_is_not_folded_forward():
    """BN on [B, C, T] (axis 1 = C) then MatMul over T with C == T."""
    g = G()
    x = g.input([2, 4, 4])
    h, bn = g.bn(x, 4)
    g.output(g.op("MatMul", [h, g.const(g.randn([4, 3]))]))
    model = g.model()
    folded, report = fold(model)
    assert_kept(model, folded, report, bn)
    assert_same_outputs(model, folded, g.feeds)


@pytest.mark.parametrize("m", [3, 5])
def test_gemm_forward_with_trans_a_is_not_folded(m):
    """BN on A [K, M] (channels = M) feeding Gemm(transA=1): BN's channels are
    Gemm's M axis, not K. With M == K (m=3) the shapes line up."""
    k = 3
    g = G()
    a = g.input([k, m])
    h, bn = g.bn(a, m)
    g.output(g.op("Gemm", [h, g.const(g.randn([k, 2])), g.const(g.randn([2]))], transA=1))
    model = g.model()
    folded, report = fold(model)
    assert_kept(model, folded, report, bn)
    assert_same_outputs(model, folded, g.feeds)


# -------------------------------------------------------------- subgraphs
def _branch(name: str, x: str, rng, outer_weight: str | None, cin=3, cout=4):
    """A subgraph computing BN(Conv(x)) on outer-scope x; the conv weight is the
    outer-scope initializer `outer_weight`, or a local one."""
    b = G(name=name, rng=rng)
    y = b.conv(x, cin, cout, [3, 3], pads=[1, 1, 1, 1], weight=outer_weight)
    out, bn = b.bn(y, cout)
    b.output(out, shape=[1, cout, 5, 5])
    return b.graph(), bn


def test_bn_in_if_branches_is_folded():
    g = G(opset=17)
    x = g.input([1, 3, 5, 5])
    cond = g.input([], dtype=np.bool_, value=np.array(True))
    w_outer = g.const(g.randn([4, 3, 3, 3], 0.5))
    then_g, bn_then = _branch("then", x, g.rng, None)
    else_g, bn_else = _branch("else", x, g.rng, w_outer)
    out = g.op("If", [cond], then_branch=then_g, else_branch=else_g)
    g.output(out, shape=[1, 4, 5, 5])
    model = g.model()
    folded, report = fold(model)
    assert count_op(folded, "BatchNormalization") == 0
    for bn in (bn_then, bn_else):
        [change] = changes_for(report, bn)
        assert (change.into, change.how) == ("Conv", "backward")
    for value in (True, False):
        feeds = dict(g.feeds, **{cond: np.array(value)})
        assert_same_outputs(model, folded, feeds)


def test_bn_in_loop_body_is_folded():
    c = 3
    g = G(opset=17)
    v0 = g.input([1, c, 5, 5])
    trip = g.const(np.array(3, dtype=np.int64))
    keep_going = g.const(np.array(True))
    body = G(name="body", rng=g.rng)
    it = body.input([], dtype=np.int64, name="iter")
    cond_in = body.input([], dtype=np.bool_, name="cond_in")
    v = body.input([1, c, 5, 5], name="v")
    y = body.conv(v, c, c, [3, 3], pads=[1, 1, 1, 1])
    out, bn = body.bn(y, c)
    act = body.op("Tanh", [out])
    cond_out = body.op("Identity", [cond_in])
    body.output(cond_out, dtype=np.bool_, shape=[])
    body.output(act, shape=[1, c, 5, 5])
    del it
    final = g.op("Loop", [trip, keep_going, v0], body=body.graph())
    g.output(final, shape=[1, c, 5, 5])
    model = g.model()
    folded, report = fold(model)
    assert count_op(folded, "BatchNormalization") == 0
    [change] = changes_for(report, bn)
    assert (change.into, change.how) == ("Conv", "backward")
    assert_same_outputs(model, folded, g.feeds)


# ------------------------------------------------ constants in other forms
def test_bn_params_from_constant_nodes_are_folded():
    g = G()
    x = g.input([2, 3, 5, 5])
    w = g.const_node(g.randn([4, 3, 3, 3], 0.5))
    y = g.conv(x, 3, 4, [3, 3], weight=w, b=g.const_node(g.randn([4])), pads=[1, 1, 1, 1])
    params = [g.const_node(a) for a in bn_params(g.rng, 4)]
    out, bn = g.bn(y, 4, param_names=params)
    g.output(out)
    model = g.model()
    folded, report = fold(model)
    assert count_op(folded, "BatchNormalization") == 0
    assert [(c.into, c.how) for c in changes_for(report, bn)] == [("Conv", "backward")]
    assert_same_outputs(model, folded, g.feeds)


def test_bn_params_computed_from_constants_are_folded():
    """FACTS.md: exporters compute parameters with Identity/Cast/Reshape/CastLike
    of initializers; those are constants too."""
    g = G(opset=17)
    x = g.input([2, 3, 5, 5])
    y = g.conv(x, 3, 4, [3, 3], pads=[1, 1, 1, 1])
    gamma, beta, mean, var = bn_params(g.rng, 4)
    scale = g.op("Identity", [g.const(gamma)])
    bias = g.op("Cast", [g.const(beta.astype(np.float64), keep_dtype=True)], to=TensorProto.FLOAT)
    mean_t = g.op("Reshape", [g.const(mean.reshape(1, 4)), g.const(np.array([-1], dtype=np.int64))])
    var_t = g.op("CastLike", [g.const(var.astype(np.float64), keep_dtype=True), g.const(np.zeros([1]))])
    out, bn = g.bn(y, 4, param_names=[scale, bias, mean_t, var_t])
    g.output(out)
    model = g.model()
    folded, report = fold(model)
    assert count_op(folded, "BatchNormalization") == 0
    assert [(c.into, c.how) for c in changes_for(report, bn)] == [("Conv", "backward")]
    assert_same_outputs(model, folded, g.feeds)


def test_conv_weight_behind_identity_is_folded_into():
    """TorchScript exports shared/tied weights as Identity(initializer)."""
    g = G()
    x = g.input([2, 3, 5, 5])
    w = g.op("Identity", [g.const(g.randn([4, 3, 3, 3], 0.5))])
    y = g.conv(x, 3, 4, [3, 3], weight=w, pads=[1, 1, 1, 1])
    out, bn = g.bn(y, 4)
    g.output(out)
    model = g.model()
    folded, report = fold(model)
    assert count_op(folded, "BatchNormalization") == 0
    assert_same_outputs(model, folded, g.feeds)


def test_chained_bn_after_conv_both_fold():
    g = G()
    _, _, out, bn1 = conv_bn(g)
    out2, bn2 = g.bn(out, 4, eps=1e-3)
    g.output(g.op("Relu", [out2]))
    model = g.model()
    folded, report = fold(model)
    assert count_op(folded, "BatchNormalization") == 0
    assert {bn1, bn2} <= {c.node for c in report.changes}
    assert_same_outputs(model, folded, g.feeds)


def test_zero_gamma_channel_folds_exactly():
    g = G()
    gamma, beta, mean, var = bn_params(g.rng, 4)
    gamma[2] = 0.0
    _, _, out, bn = conv_bn(g, params=(gamma, beta, mean, var))
    g.output(out)
    model = g.model()
    folded, _ = fold(model)
    assert count_op(folded, "BatchNormalization") == 0
    assert_same_outputs(model, folded, g.feeds)


@pytest.mark.parametrize("opset", [9, 11, 13, 14, 15])
def test_conv_bn_folds_at_older_opsets(opset):
    g = G(opset=opset)
    _, _, out, bn = conv_bn(g)
    g.output(out)
    model = g.model()
    folded, report = fold(model)
    assert count_op(folded, "BatchNormalization") == 0
    assert [o.version for o in folded.opset_import if o.domain in ("", "ai.onnx")] == [opset]
    assert_same_outputs(model, folded, g.feeds)


def test_bn_after_concat_folds_forward_into_1x1_conv():
    g = G()
    x = g.input([1, 3, 5, 5])
    a = g.conv(x, 3, 2, [3, 3], pads=[1, 1, 1, 1])
    b = g.conv(x, 3, 3, [1, 1])
    cat = g.op("Concat", [a, b], axis=1)
    h, bn = g.bn(cat, 5)
    g.output(g.conv(h, 5, 4, [1, 1]))
    model = g.model()
    folded, report = fold(model)
    assert count_op(folded, "BatchNormalization") == 0
    assert [(c.into, c.how) for c in changes_for(report, bn)] == [("Conv", "forward")]
    assert_same_outputs(model, folded, g.feeds)


# ------------------------------------------------------ options
@pytest.mark.parametrize("rank", [2, 3, 4])
def test_standalone_affine_rewrites_remaining_bn(rank):
    g = G()
    c = 3
    x = g.input([2, c, 4, 5][:rank])
    h, bn = g.bn(x, c, eps=1e-3)
    g.output(g.op("Sigmoid", [h]))
    model = g.model()
    kept, report_keep = fold(model)  # default: keep
    assert_kept(model, kept, report_keep, bn)
    folded, report = fold(model, standalone="affine")
    assert count_op(folded, "BatchNormalization") == 0
    assert count_op(folded, "Mul") >= 1 and count_op(folded, "Add") >= 1
    assert [(c.into, c.how) for c in changes_for(report, bn)] == [("Mul+Add", "standalone")]
    assert_same_outputs(model, folded, g.feeds)


def test_standalone_affine_applies_to_bn_skipped_for_padding():
    g = G()
    x = g.input([1, 3, 5, 5])
    h, bn = g.bn(x, 3)
    g.output(g.conv(h, 3, 2, [3, 3], pads=[1, 1, 1, 1]))
    model = g.model()
    folded, report = fold(model, standalone="affine")
    assert count_op(folded, "BatchNormalization") == 0
    assert [(c.into, c.how) for c in changes_for(report, bn)] == [("Mul+Add", "standalone")]
    assert_same_outputs(model, folded, g.feeds)


def test_standalone_affine_fp16():
    g = G(np.float16)
    x = g.input([2, 4, 3, 3])
    h, bn = g.bn(x, 4)
    g.output(g.op("Relu", [h]))
    model = g.model()
    folded, report = fold(model, standalone="affine")
    assert count_op(folded, "BatchNormalization") == 0
    assert_same_outputs(model, folded, g.feeds)


def test_direction_backward_does_not_fold_forward():
    g = G()
    x = g.input([1, 3, 4, 4])
    h, bn = g.bn(x, 3)
    g.output(g.conv(h, 3, 2, [1, 1]))
    model = g.model()
    folded, report = fold(model, direction="backward")
    assert_kept(model, folded, report, bn)
    both, _ = fold(model)
    assert count_op(both, "BatchNormalization") == 0


def test_direction_forward_does_not_fold_backward():
    g = G()
    _, _, out, bn = conv_bn(g)
    g.output(g.op("Relu", [out]))
    model = g.model()
    folded, report = fold(model, direction="forward")
    assert_kept(model, folded, report, bn)
    both, _ = fold(model)
    assert count_op(both, "BatchNormalization") == 0


@pytest.mark.parametrize("kw", [{"direction": "sideways"}, {"standalone": "drop"}])
def test_bad_options_are_rejected(kw):
    g = G()
    _, _, out, _ = conv_bn(g)
    g.output(out)
    import normfold

    with pytest.raises((ValueError, normfold.NormfoldError)):
        normfold.fold_bn(g.model(), **kw)


# ------------------------------------------------------ output model hygiene
def test_unused_initializers_are_removed():
    g = G()
    x, y, out, bn = conv_bn(g)
    g.output(out)
    model = g.model()
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    old_w = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == conv.input[1]))
    bn_node = next(n for n in model.graph.node if n.name == bn)
    folded, _ = fold(model)
    assert count_op(folded, "BatchNormalization") == 0
    names = initializer_names(folded)
    assert names <= used_names(folded), f"unused initializers left: {names - used_names(folded)}"
    assert not names & set(bn_node.input[1:]), "BN parameters left in the model"
    for init in folded.graph.initializer:
        arr = numpy_helper.to_array(init)
        assert not (arr.shape == old_w.shape and np.array_equal(arr, old_w)), "the old conv weight is still stored"
    assert len(folded.graph.initializer) == 2  # folded weight + bias


def test_input_model_is_not_modified():
    g = G()
    x = g.input([1, 3, 5, 5])
    cond = g.input([], dtype=np.bool_, value=np.array(True))
    then_g, _ = _branch("then", x, g.rng, None)
    else_g, _ = _branch("else", x, g.rng, None)
    y = g.op("If", [cond], then_branch=then_g, else_branch=else_g)
    h, _ = g.bn(y, 4)
    g.output(g.conv(h, 4, 2, [1, 1]))
    model = g.model()
    model.graph.value_info.append(helper.make_tensor_value_info(y, TensorProto.FLOAT, [1, 4, 5, 5]))
    before = model.SerializeToString()
    for kw in ({}, {"direction": "forward"}, {"standalone": "affine"}):
        import normfold

        normfold.fold_bn(model, **kw)
        assert model.SerializeToString() == before


def test_output_keeps_ir_version_opsets_and_metadata():
    g = G(opset=13)
    _, _, out, _ = conv_bn(g)
    g.output(out)
    model = g.model(ir_version=7)
    model.producer_name = "someone"
    model.doc_string = "doc"
    helper.set_model_props(model, {"author": "tests"})
    folded, _ = fold(model)
    assert folded.ir_version == 7
    assert [(o.domain, o.version) for o in folded.opset_import] == [(o.domain, o.version) for o in model.opset_import]
    assert folded.producer_name == "someone" and folded.doc_string == "doc"
    assert {p.key: p.value for p in folded.metadata_props} == {"author": "tests"}
    assert [o.name for o in folded.graph.output] == [o.name for o in model.graph.output]
    assert [i.name for i in folded.graph.input] == [i.name for i in model.graph.input]


def test_report_to_dict_is_consistent():
    g = G()
    _, y, out, bn_folded = conv_bn(g)
    x2 = g.input([1, 4, 5, 5])
    h, bn_kept = g.bn(x2, 4)
    g.output(out)
    g.output(g.op("Relu", [h]))
    model = g.model()
    folded, report = fold(model)
    d = report.to_dict()
    import json

    json.dumps(d)
    assert d["changed"] == len(report.changes) == 1
    assert d["skipped"] == len(report.skipped) == 1
    assert d["changes"][0]["node"] == bn_folded and d["changes"][0]["into"] == "Conv"
    assert d["skips"][0]["node"] == bn_kept and d["skips"][0]["reason"]
    assert d["by_kind"] and sum(d["by_kind"].values()) == 1
    assert sum(d["skip_reasons"].values()) == 1
    assert count_op(folded, "BatchNormalization") == 1
    assert_same_outputs(model, folded, g.feeds)


def test_ort_reference_sees_the_difference():
    """Guard on the oracle itself: ORT with optimizations disabled must notice a
    wrong fold (here: BN simply deleted), else every comparison above is void."""
    g = G()
    _, y, out, bn = conv_bn(g)
    g.output(out)
    model = g.model()
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    node = next(n for n in broken.graph.node if n.name == bn)
    conv = next(n for n in broken.graph.node if n.op_type == "Conv")
    conv.output[0] = node.output[0]
    broken.graph.node.remove(node)
    with pytest.raises(AssertionError):
        assert_same_outputs(model, broken, g.feeds)
    np.testing.assert_array_equal(ort_run(model, g.feeds)[0], ort_run(model, g.feeds)[0])


def test_conv_bias_built_from_weight_shape_is_a_constant():
    """The dynamo exporter (optimize=False) gives a bias-less conv the bias
    Expand(CastLike(0, activation), Shape(weight)[0:1]): CastLike reads only the
    activation's *type*, so the bias is computable from constants (FACTS.md)."""
    g = G(opset=18)
    x = g.input([2, 3, 5, 5])
    act = g.op("Relu", [x])
    w = g.const(g.randn([4, 3, 3, 3], 0.5))
    n_out = g.op("Shape", [w], start=0, end=1)
    zero = g.op("CastLike", [g.const_node(np.array(0.0)), act])
    bias = g.op("Expand", [zero, n_out])
    y = g.conv(act, 3, 4, [3, 3], weight=w, b=bias, pads=[1, 1, 1, 1])
    out, bn = g.bn(y, 4)
    g.output(out)
    model = g.model()
    folded, report = fold(model)
    assert count_op(folded, "BatchNormalization") == 0, report.skipped
    assert [(c.into, c.how) for c in changes_for(report, bn)] == [("Conv", "backward")]
    assert_same_outputs(model, folded, g.feeds)


def _if_reading(g: G, captured: str, shape):
    """An If whose branches read the outer-scope tensor `captured` (implicit
    input: no edge in the main graph shows it)."""
    cond = g.input([], dtype=np.bool_, value=np.array(True))
    then_b = G(name="then_r", rng=g.rng)
    then_b.output(then_b.op("Relu", [captured]), shape=shape)
    else_b = G(name="else_r", rng=g.rng)
    else_b.output(else_b.op("Neg", [captured]), shape=shape)
    return g.op("If", [cond], then_branch=then_b.graph(), else_branch=else_b.graph()), cond


def test_producer_output_read_inside_a_subgraph_is_not_changed():
    """Conv output feeds BN and is also read by an If branch (outer scope):
    folding BN into the conv would change what the branch sees."""
    g = G()
    x, y, out, bn = conv_bn(g)
    captured, cond = _if_reading(g, y, [2, 4, 5, 5])
    g.output(out)
    g.output(captured)
    model = g.model()
    folded, report = fold(model)
    for value in (True, False):
        assert_same_outputs(model, folded, dict(g.feeds, **{cond: np.array(value)}))
    assert_kept(model, folded, report, bn)


def test_bn_output_read_inside_a_subgraph_is_not_folded_forward():
    g = G()
    x = g.input([1, 3, 4, 4])
    h, bn = g.bn(x, 3)
    captured, cond = _if_reading(g, h, [1, 3, 4, 4])
    g.output(g.conv(h, 3, 2, [1, 1]))
    g.output(captured)
    model = g.model()
    folded, report = fold(model)
    for value in (True, False):
        assert_same_outputs(model, folded, dict(g.feeds, **{cond: np.array(value)}))
    assert_kept(model, folded, report, bn)


def test_input_with_unnamed_constant_value_is_not_modified():
    """TorchScript writes Constant values as tensors without a name field;
    fold_bn must not touch them in the caller's ModelProto."""
    g = G(opset=13)
    x = g.input([1, 3, 5, 5])
    _, _, out, _ = conv_bn(g)
    axes = numpy_helper.from_array(np.array([2], dtype=np.int64))
    axes.ClearField("name")
    g.nodes.append(helper.make_node("Constant", [], ["axes"], name="axes_const", value=axes))
    g.output(g.op("Unsqueeze", [out, "axes"]))
    g.output(g.op("Relu", [x]))
    model = g.model()
    before = model.SerializeToString()
    import normfold

    folded, _ = normfold.fold_bn(model)
    assert model.SerializeToString() == before, "fold_bn modified its input ModelProto"
    assert count_op(folded, "BatchNormalization") == 0


def test_bn_in_scan_body_is_folded():
    c = 3
    g = G(opset=17)
    xs = g.input([4, 1, c, 5, 5])  # scanned over axis 0
    body = G(name="scan_body", rng=g.rng)
    x_t = body.input([1, c, 5, 5], name="x_t")
    y = body.conv(x_t, c, 2, [3, 3], pads=[1, 1, 1, 1])
    out, bn = body.bn(y, 2)
    body.output(out, shape=[1, 2, 5, 5])
    ys = g.op("Scan", [xs], body=body.graph(), num_scan_inputs=1)
    g.output(ys, shape=[4, 1, 2, 5, 5])
    model = g.model()
    folded, report = fold(model)
    assert count_op(folded, "BatchNormalization") == 0
    assert [(c.into, c.how) for c in changes_for(report, bn)] == [("Conv", "backward")]
    assert_same_outputs(model, folded, g.feeds)


def test_bn_params_shared_with_a_kept_bn_are_not_changed():
    """Two BNs read the same parameter initializers; one folds, the other stays
    and must still see the original statistics."""
    g = G()
    c = 4
    names = [g.const(a) for a in bn_params(g.rng, c)]
    x = g.input([2, 3, 5, 5])
    y = g.conv(x, 3, c, [3, 3], pads=[1, 1, 1, 1])
    out1, bn1 = g.bn(y, c, param_names=names)
    x2 = g.input([2, c, 3, 3])
    out2, bn2 = g.bn(x2, c, param_names=names)
    g.output(out1)
    g.output(g.op("Relu", [out2]))
    model = g.model()
    folded, report = fold(model)
    assert [(c.into, c.how) for c in changes_for(report, bn1)] == [("Conv", "backward")]
    assert_kept(model, folded, report, bn2)
    assert_same_outputs(model, folded, g.feeds)


def test_bn_output_also_read_by_shape_still_folds_forward():
    """A Shape reader sees only BN's output shape, which equals its input's:
    the forward fold stays exact, and the Shape result must not change."""
    g = G()
    x = g.input([2, 3, 4, 4])
    h, bn = g.bn(x, 3)
    g.output(g.conv(h, 3, 2, [1, 1]))
    g.output(g.op("Shape", [h]), dtype=np.int64)
    model = g.model()
    folded, report = fold(model)
    assert count_op(folded, "BatchNormalization") == 0
    assert_same_outputs(model, folded, g.feeds)
    np.testing.assert_array_equal(ort_run(folded, g.feeds)[1], [2, 3, 4, 4])

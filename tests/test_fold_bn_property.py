"""Property tests of `normfold.fold_bn` on random graphs.

Every folded model is checked against onnxruntime running the ORIGINAL model
with all graph optimizations disabled (tests/graphs.py), with randomized
running statistics and affine parameters. Tolerances (graphs.tolerance):
fp32 max abs error <= 1e-5 * max(1, max|ref|); fp16 within fp16 rounding.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.helpers.graphs import G, assert_same_outputs, bn_params, changes_for, count_op, fold, skips_for

seeds = st.integers(0, 2**32 - 1)
float_dtypes = st.sampled_from([np.float32, np.float16])
epsilons = st.sampled_from([1e-5, 1e-3, 0.1])


def assert_folded(report, bn_name: str, into: str, how: str):
    changes = changes_for(report, bn_name)
    assert changes, f"{bn_name} not in report.changes: {report.changes} / skipped {report.skipped}"
    for c in changes:
        assert (c.into, c.how) == (into, how), f"{bn_name}: reported {c.into}/{c.how}, expected {into}/{how}"
        assert c.op == "BatchNormalization"
    assert not skips_for(report, bn_name), f"{bn_name} both folded and skipped: {report.skipped}"


@st.composite
def conv_geometry(draw, rank=None, padded=None):
    """(rank, cin, cout, group, kernel, strides, dilations, pads, spatial) of a valid Conv."""
    rank = rank or draw(st.sampled_from([1, 2, 3]))
    kind = draw(st.sampled_from(["plain", "grouped", "depthwise"]))
    if kind == "plain":
        group, cin, cout = 1, draw(st.integers(1, 4)), draw(st.integers(1, 5))
    elif kind == "grouped":
        group = draw(st.integers(2, 3))
        cin, cout = group * draw(st.integers(1, 2)), group * draw(st.integers(1, 3))
    else:
        cin = group = draw(st.integers(2, 5))
        cout = cin * draw(st.integers(1, 2))
    kmax = 3 if rank < 3 else 2
    kernel = [draw(st.integers(1, kmax)) for _ in range(rank)]
    strides = [draw(st.integers(1, 2)) for _ in range(rank)]
    dilations = [draw(st.integers(1, 2)) for _ in range(rank)]
    if padded is None:
        padded = draw(st.booleans())
    if padded:
        pads = [draw(st.integers(0, 2)) for _ in range(2 * rank)]
        if not any(pads):
            pads[0] = 1
    else:
        pads = [0] * (2 * rank)
    spatial = [draw(st.integers(d * (k - 1) + 1, d * (k - 1) + 4 if rank < 3 else d * (k - 1) + 2))
               for k, d in zip(kernel, dilations)]
    return rank, cin, cout, group, kernel, strides, dilations, pads, spatial


# ---------------------------------------------------------------- backward
@given(seed=seeds, geo=conv_geometry(), bias=st.booleans(), dtype=float_dtypes, eps=epsilons,
       batch=st.integers(1, 2), k=st.sampled_from([0.1, 1.0, 5.0]))
def test_conv_then_bn_folds_backward(seed, geo, bias, dtype, eps, batch, k):
    rank, cin, cout, group, kernel, strides, dilations, pads, spatial = geo
    g = G(dtype, rng=np.random.default_rng(seed))
    x = g.input([batch, cin, *spatial])
    y = g.conv(x, cin, cout, kernel, group=group, bias=bias, strides=strides, dilations=dilations, pads=pads)
    out, bn = g.bn(y, cout, eps=eps, params=bn_params(g.rng, cout, k=k))
    g.output(g.op("Relu", [out]))
    model = g.model()
    folded, report = fold(model)
    assert count_op(folded, "BatchNormalization") == 0
    assert count_op(folded, "Conv") == 1
    assert_folded(report, bn, "Conv", "backward")
    assert_same_outputs(model, folded, g.feeds)


@given(seed=seeds, rank=st.sampled_from([1, 2]), group=st.sampled_from([1, 2, 3]), bias=st.booleans(),
       dtype=float_dtypes, data=st.data())
def test_conv_transpose_then_bn_folds_backward(seed, rank, group, bias, dtype, data):
    cin = group * data.draw(st.integers(1, 2))
    cout = group * data.draw(st.integers(1, 3))
    kernel = [data.draw(st.integers(1, 3)) for _ in range(rank)]
    strides = [data.draw(st.integers(1, 3)) for _ in range(rank)]
    output_padding = [data.draw(st.integers(0, s - 1)) for s in strides]
    dilations = [data.draw(st.integers(1, 2)) for _ in range(rank)]
    # begin + end pad <= d*(k-1) keeps every output dimension >= 1
    pads = [data.draw(st.integers(0, d * (k - 1) // 2)) for _ in range(2) for k, d in zip(kernel, dilations)]
    spatial = [data.draw(st.integers(2, 4)) for _ in range(rank)]
    g = G(dtype, rng=np.random.default_rng(seed))
    x = g.input([1, cin, *spatial])
    y = g.conv_transpose(x, cin, cout, kernel, group=group, bias=bias, strides=strides, pads=pads,
                         output_padding=output_padding, dilations=dilations)
    out, bn = g.bn(y, cout)
    g.output(out)
    model = g.model()
    folded, report = fold(model)
    assert count_op(folded, "BatchNormalization") == 0
    assert count_op(folded, "ConvTranspose") == 1
    assert_folded(report, bn, "ConvTranspose", "backward")
    assert_same_outputs(model, folded, g.feeds)


C_SHAPES = ["none", "scalar", "[N]", "[1,N]", "[M,N]"]


def gemm_c(g: G, c_shape: str, m: int, n: int):
    return {
        "none": None,
        "scalar": lambda: g.const(g.randn([])),
        "[N]": lambda: g.const(g.randn([n])),
        "[1,N]": lambda: g.const(g.randn([1, n])),
        "[M,N]": lambda: g.const(g.randn([m, n])),
    }[c_shape]


@given(seed=seeds, m=st.integers(1, 4), k=st.integers(1, 5), n=st.integers(1, 5), trans_a=st.booleans(),
       trans_b=st.booleans(), alpha=st.sampled_from([1.0, 0.5, -2.0]), beta=st.sampled_from([1.0, 0.0, 0.7]),
       c_shape=st.sampled_from(C_SHAPES), dtype=st.sampled_from([np.float32, np.float16, np.float64]))
def test_gemm_then_bn_folds_backward(seed, m, k, n, trans_a, trans_b, alpha, beta, c_shape, dtype):
    g = G(dtype, rng=np.random.default_rng(seed))
    a = g.input([k, m] if trans_a else [m, k])
    b = g.const(g.randn([n, k] if trans_b else [k, n]))
    make_c = gemm_c(g, c_shape, m, n)
    ins = [a, b] + ([make_c()] if make_c else [])
    y = g.op("Gemm", ins, alpha=alpha, beta=beta, transA=int(trans_a), transB=int(trans_b))
    out, bn = g.bn(y, n)
    g.output(out)
    model = g.model()
    folded, report = fold(model)
    assert count_op(folded, "BatchNormalization") == 0
    assert count_op(folded, "Gemm") == 1
    assert_folded(report, bn, "Gemm", "backward")
    assert_same_outputs(model, folded, g.feeds)


@given(seed=seeds, m=st.integers(1, 4), k=st.integers(1, 6), n=st.integers(1, 6),
       bias=st.sampled_from(["none", "[N] right", "[N] left", "[1,N] right"]),
       dtype=st.sampled_from([np.float32, np.float16, np.float64]))
def test_matmul_then_bn_folds_backward(seed, m, k, n, bias, dtype):
    g = G(dtype, rng=np.random.default_rng(seed))
    x = g.input([m, k])
    y = g.op("MatMul", [x, g.const(g.randn([k, n]))])
    if bias != "none":
        bvec = g.const(g.randn([1, n] if bias.startswith("[1,N]") else [n]))
        y = g.op("Add", [bvec, y] if bias.endswith("left") else [y, bvec])
    out, bn = g.bn(y, n)
    g.output(out)
    model = g.model()
    folded, report = fold(model)
    assert count_op(folded, "BatchNormalization") == 0
    assert count_op(folded, "MatMul") == 1
    assert_folded(report, bn, "MatMul", "backward")
    assert_same_outputs(model, folded, g.feeds)


# ----------------------------------------------------------------- forward
@given(seed=seeds, geo=conv_geometry(padded=False), bias=st.booleans(), dtype=float_dtypes,
       valid=st.booleans(), eps=epsilons)
def test_bn_on_input_then_unpadded_conv_folds_forward(seed, geo, bias, dtype, valid, eps):
    rank, cin, cout, group, kernel, strides, dilations, pads, spatial = geo
    g = G(dtype, rng=np.random.default_rng(seed))
    x = g.input([2, cin, *spatial])
    h, bn = g.bn(x, cin, eps=eps)
    pad_attr = {"auto_pad": "VALID"} if valid else {"pads": pads}
    g.output(g.conv(h, cin, cout, kernel, group=group, bias=bias, strides=strides, dilations=dilations,
                    **pad_attr))
    model = g.model()
    folded, report = fold(model)
    assert count_op(folded, "BatchNormalization") == 0
    assert_folded(report, bn, "Conv", "forward")
    assert_same_outputs(model, folded, g.feeds)


@given(seed=seeds, geo=conv_geometry(padded=True), bias=st.booleans(), dtype=float_dtypes)
def test_bn_with_zero_shift_then_padded_conv_folds_forward(seed, geo, bias, dtype):
    rank, cin, cout, group, kernel, strides, dilations, pads, spatial = geo
    g = G(dtype, rng=np.random.default_rng(seed))
    x = g.input([1, cin, *spatial])
    h, bn = g.bn(x, cin, params=bn_params(g.rng, cin, zero_shift=True))
    g.output(g.conv(h, cin, cout, kernel, group=group, bias=bias, strides=strides, dilations=dilations,
                    pads=pads))
    model = g.model()
    folded, report = fold(model)
    assert count_op(folded, "BatchNormalization") == 0
    assert_folded(report, bn, "Conv", "forward")
    assert_same_outputs(model, folded, g.feeds)


@given(seed=seeds, geo=conv_geometry(padded=True), auto_pad=st.sampled_from([None, "SAME_UPPER", "SAME_LOWER"]))
def test_bn_with_shift_then_padded_conv_is_skipped(seed, geo, auto_pad):
    rank, cin, cout, group, kernel, strides, dilations, pads, spatial = geo
    if auto_pad:  # stride 1 and kernel > 1: SAME really pads
        kernel = [max(k, 2) for k in kernel]
        strides = dilations = [1] * rank  # onnxruntime: no dilation with SAME
        spatial = [max(s, d * (k - 1) + 1) for s, k, d in zip(spatial, kernel, dilations)]
        pad_attr = {"auto_pad": auto_pad}
    else:  # a begin pad of the first axis is always read by the first window
        pads[0] = max(pads[0], 1)
        pad_attr = {"pads": pads}
    g = G(np.float32, rng=np.random.default_rng(seed))
    x = g.input([1, cin, *spatial])
    gamma, beta, mean, var = bn_params(g.rng, cin)
    beta = beta + np.sign(beta) + 0.5  # with mean = 0, t = beta is far from 0 on every channel
    h, bn = g.bn(x, cin, params=(gamma, beta, np.zeros(cin), var))
    g.output(g.conv(h, cin, cout, kernel, group=group, strides=strides, dilations=dilations, **pad_attr))
    model = g.model()
    folded, report = fold(model)
    assert count_op(folded, "BatchNormalization") == 1
    assert not changes_for(report, bn)
    skips = skips_for(report, bn)
    assert len(skips) == 1 and skips[0].op == "BatchNormalization"
    assert "pad" in skips[0].reason.lower(), skips[0].reason
    assert_same_outputs(model, folded, g.feeds)


@given(seed=seeds, m=st.integers(1, 4), k=st.integers(1, 5), n=st.integers(1, 5), trans_b=st.booleans(),
       alpha=st.sampled_from([1.0, 0.5, -2.0]), beta=st.sampled_from([1.0, 0.0, 0.7]),
       c_shape=st.sampled_from(C_SHAPES), dtype=st.sampled_from([np.float32, np.float16, np.float64]))
def test_bn_then_gemm_folds_forward(seed, m, k, n, trans_b, alpha, beta, c_shape, dtype):
    g = G(dtype, rng=np.random.default_rng(seed))
    a = g.input([m, k])
    h, bn = g.bn(a, k)
    b = g.const(g.randn([n, k] if trans_b else [k, n]))
    make_c = gemm_c(g, c_shape, m, n)
    ins = [h, b] + ([make_c()] if make_c else [])
    g.output(g.op("Gemm", ins, alpha=alpha, beta=beta, transB=int(trans_b)))
    model = g.model()
    folded, report = fold(model)
    assert count_op(folded, "BatchNormalization") == 0
    assert_folded(report, bn, "Gemm", "forward")
    assert_same_outputs(model, folded, g.feeds)


@given(seed=seeds, m=st.integers(1, 4), k=st.integers(1, 6), n=st.integers(1, 6),
       bias=st.sampled_from(["none", "[N]", "[1,N]"]), dtype=st.sampled_from([np.float32, np.float16, np.float64]))
def test_bn_then_matmul_folds_forward(seed, m, k, n, bias, dtype):
    g = G(dtype, rng=np.random.default_rng(seed))
    x = g.input([m, k])
    h, bn = g.bn(x, k)
    y = g.op("MatMul", [h, g.const(g.randn([k, n]))])
    if bias != "none":
        y = g.op("Add", [y, g.const(g.randn([1, n] if bias == "[1,N]" else [n]))])
    g.output(y)
    model = g.model()
    folded, report = fold(model)
    assert count_op(folded, "BatchNormalization") == 0
    assert_folded(report, bn, "MatMul", "forward")
    assert_same_outputs(model, folded, g.feeds)


@given(seed=seeds, cin=st.integers(1, 4), g1=st.sampled_from([1, "dw"]), dtype=float_dtypes)
def test_bn_output_feeding_several_convs_folds_into_all(seed, cin, g1, dtype):
    g = G(dtype, rng=np.random.default_rng(seed))
    x = g.input([2, cin, 5, 5])
    h, bn = g.bn(x, cin)
    group = cin if g1 == "dw" else 1
    y1 = g.conv(h, cin, 3 * group if g1 == "dw" else 3, [1, 1], group=group)
    y2 = g.conv(h, cin, 2, [3, 3], bias=False, strides=[2, 2])
    y3 = g.conv(h, cin, 4, [2, 1], dilations=[2, 1], pads=[0, 0, 0, 0])
    for y in (y1, y2, y3):
        g.output(y)
    model = g.model()
    folded, report = fold(model)
    assert count_op(folded, "BatchNormalization") == 0
    assert count_op(folded, "Conv") == 3
    assert_folded(report, bn, "Conv", "forward")
    assert_same_outputs(model, folded, g.feeds)


# ------------------------------------------------------- shared weights
@given(seed=seeds, dtype=float_dtypes, share_bias=st.booleans(), which=st.sampled_from(["backward", "forward"]))
def test_shared_conv_weights_are_copied_not_mutated(seed, dtype, share_bias, which):
    """Two convs use the same weight (and bias) initializers; only one has a BN.
    The other conv must compute exactly what it computed before."""
    g = G(dtype, rng=np.random.default_rng(seed))
    c = 3
    w = g.const(g.randn([4, c, 1, 1]))
    b = g.const(g.randn([4])) if share_bias else None
    x1 = g.input([1, c, 4, 4])
    x2 = g.input([1, c, 4, 4])
    if which == "backward":
        y1 = g.conv(x1, c, 4, [1, 1], weight=w, b=b, bias=share_bias)
        out1, bn = g.bn(y1, 4)
    else:
        h, bn = g.bn(x1, c)
        out1 = g.conv(h, c, 4, [1, 1], weight=w, b=b, bias=share_bias)
    out2 = g.conv(x2, c, 4, [1, 1], weight=w, b=b, bias=share_bias)
    g.output(out1)
    g.output(out2)
    model = g.model()
    folded, report = fold(model)
    assert count_op(folded, "BatchNormalization") == 0
    assert_folded(report, bn, "Conv", which)
    refs = assert_same_outputs(model, folded, g.feeds)
    # the untouched conv is not only close but bit-identical
    from tests.helpers.graphs import ort_run

    assert np.array_equal(ort_run(folded, g.feeds)[1], refs[1])


@given(seed=seeds, trans_b=st.booleans())
def test_shared_gemm_weight_and_bias(seed, trans_b):
    g = G(np.float32, rng=np.random.default_rng(seed))
    b = g.const(g.randn([5, 3] if trans_b else [3, 5]))
    c = g.const(g.randn([5]))
    a1, a2 = g.input([2, 3]), g.input([2, 3])
    y1 = g.op("Gemm", [a1, b, c], transB=int(trans_b))
    out1, bn = g.bn(y1, 5)
    out2 = g.op("Gemm", [a2, b, c], transB=int(trans_b))
    g.output(out1)
    g.output(out2)
    model = g.model()
    folded, report = fold(model)
    assert count_op(folded, "BatchNormalization") == 0
    assert_folded(report, bn, "Gemm", "backward")
    assert_same_outputs(model, folded, g.feeds)


@given(seed=seeds, dtype=float_dtypes)
def test_conv_bn_conv_folds_either_way(seed, dtype):
    g = G(dtype, rng=np.random.default_rng(seed))
    x = g.input([1, 3, 6, 6])
    y = g.conv(x, 3, 4, [3, 3], pads=[1, 1, 1, 1])
    h, bn = g.bn(y, 4)
    g.output(g.conv(h, 4, 2, [1, 1]))
    model = g.model()
    for direction in ("both", "backward", "forward"):
        folded, report = fold(model, direction=direction)
        assert count_op(folded, "BatchNormalization") == 0, direction
        [change] = changes_for(report, bn)
        assert change.into == "Conv"
        assert change.how == direction if direction != "both" else change.how in ("backward", "forward")
        assert_same_outputs(model, folded, g.feeds)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_bn_params_in_fp64_arithmetic(dtype):
    """Large mean and small var: computing s and t in the model's dtype loses
    digits that float64 arithmetic keeps (NORMS.md: fold in float64)."""
    g = G(dtype, rng=np.random.default_rng(7))
    c = 4
    x = g.input([2, c, 5, 5])
    y = g.conv(x, c, c, [3, 3], pads=[1, 1, 1, 1])
    gamma = np.array([1.3, -0.7, 2.0, 0.9])
    beta = np.array([0.5, -1.0, 0.25, 2.0])
    mean = np.array([3.0, -2.5, 1.5, 4.0]) if dtype == np.float16 else np.array([30.0, -25.0, 15.0, 40.0])
    var = np.array([0.1, 0.2, 3.5, 0.15])
    out, bn = g.bn(y, c, params=(gamma, beta, mean, var), eps=1e-3)
    g.output(out)
    model = g.model()
    folded, _ = fold(model)
    assert count_op(folded, "BatchNormalization") == 0
    assert_same_outputs(model, folded, g.feeds)


def _retype(model, src: int, dst: int):
    """Copy of `model` with every `src`-typed initializer, input and output
    converted to `dst` (float32 <-> bfloat16, exact from bf16 to fp32)."""
    import onnx
    from onnx import TensorProto, numpy_helper

    ml_dtypes = pytest.importorskip("ml_dtypes")
    np_dst = {TensorProto.BFLOAT16: ml_dtypes.bfloat16, TensorProto.FLOAT: np.float32}[dst]
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for i, t in enumerate(out.graph.initializer):
        if t.data_type == src:
            arr = numpy_helper.to_array(t).astype(np.float32).astype(np_dst)
            out.graph.initializer[i].CopyFrom(numpy_helper.from_array(arr, t.name))
    for vi in list(out.graph.input) + list(out.graph.output):
        if vi.type.tensor_type.elem_type == src:
            vi.type.tensor_type.elem_type = dst
    return out


@given(seed=seeds, kind=st.sampled_from(["gemm", "matmul+add", "bn->gemm"]))
def test_bf16_model_folds_and_stays_bf16(seed, kind):
    """onnxruntime has no bf16 CPU kernels: fold the bf16 model, then compare
    both models widened (exactly) to fp32; the difference is bf16 rounding of
    the folded weights only."""
    from onnx import TensorProto

    from tests.helpers.graphs import ort_run

    g = G(np.float32, rng=np.random.default_rng(seed))
    x = g.input([3, 4])
    if kind == "bn->gemm":
        h, bn = g.bn(x, 4)
        out = g.op("Gemm", [h, g.const(g.randn([4, 5])), g.const(g.randn([5]))])
        into, how = "Gemm", "forward"
    else:
        if kind == "gemm":
            y = g.op("Gemm", [x, g.const(g.randn([5, 4])), g.const(g.randn([5]))], transB=1, beta=0.5)
            into = "Gemm"
        else:
            y = g.op("Add", [g.op("MatMul", [x, g.const(g.randn([4, 5]))]), g.const(g.randn([5]))])
            into = "MatMul"
        out, bn = g.bn(y, 5)
        how = "backward"
    g.output(out)
    bf16 = _retype(g.model(), TensorProto.FLOAT, TensorProto.BFLOAT16)
    folded, report = fold(bf16)
    assert count_op(folded, "BatchNormalization") == 0
    assert_folded(report, bn, into, how)
    types = {t.data_type for t in folded.graph.initializer}
    assert types == {TensorProto.BFLOAT16}, f"folded initializers are not all bf16: {types}"
    [ref] = ort_run(_retype(bf16, TensorProto.BFLOAT16, TensorProto.FLOAT), g.feeds)
    [got] = ort_run(_retype(folded, TensorProto.BFLOAT16, TensorProto.FLOAT), g.feeds)
    scale = max(1.0, float(np.abs(ref).max()))
    assert np.max(np.abs(got - ref)) <= 16 * 2.0**-8 * scale

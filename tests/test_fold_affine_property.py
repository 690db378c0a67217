"""Property tests of `normfold.fold_affine` on random graphs: chains of
per-channel Mul/Div/Add/Sub by constants (either operand order; scalar or
per-channel constants as initializers, Constant nodes or Cast subgraphs) after
or before Conv (1-D/2-D/3-D, groups, depthwise, pads), ConvTranspose, Gemm and
MatMul, in fp32/fp16/fp64.

Every folded model is checked against onnxruntime running the ORIGINAL model
with all graph optimizations disabled (tests/helpers/graphs.py), with the
tolerances of graphs.tolerance.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from tests.helpers.graphs import ONNX_TYPE, G, assert_same_outputs, bn_params, changes_for, count_op, fold, \
    node_names, skips_for
from tests.test_fold_bn_property import conv_geometry, gemm_c

seeds = st.integers(0, 2**32 - 1)
dtypes = st.sampled_from([np.float32, np.float16, np.float64])
conv_dtypes = st.sampled_from([np.float32, np.float16])  # onnxruntime's CPU Conv has no float64 kernel
# x*c, c*x, x/c, x+c, c+x, x-c, c-x
STEP_KINDS = ["mul", "mul_l", "div", "add", "add_l", "sub", "rsub"]
chains = st.lists(st.sampled_from(STEP_KINDS), min_size=1, max_size=3)
sources = st.sampled_from(["init", "node", "cast"])


def affine_fold(model, **options):
    return fold(model, api="fold_affine", **options)


def constant(g: G, values: np.ndarray, source: str) -> str:
    if source == "node":
        return g.const_node(values)
    if source == "cast":  # a small constant subgraph: Cast of a float64 initializer
        return g.op("Cast", [g.const(values.astype(np.float64), keep_dtype=True)], to=ONNX_TYPE[g.dtype])
    return g.const(values)


def apply_chain(g: G, x: str, kinds, shape, source: str, scalar_steps=()) -> tuple[str, list[str]]:
    """x through one step per kind, each with a constant of `shape` (scalar `[]`
    for the steps in `scalar_steps`); returns (output, node names)."""
    names = []
    for i, kind in enumerate(kinds):
        step_shape = [] if i in scalar_steps else shape
        values = g.rng.uniform(0.5, 2.0, step_shape) * g.rng.choice([-1.0, 1.0], step_shape)
        c = constant(g, values, source)
        op = {"mul": "Mul", "mul_l": "Mul", "div": "Div", "add": "Add", "add_l": "Add", "sub": "Sub",
              "rsub": "Sub"}[kind]
        inputs = [c, x] if kind in ("mul_l", "add_l", "rsub") else [x, c]
        name = g.fresh(op)
        x = g.op(op, inputs, name=name)
        names.append(name)
    return x, names


def channel_shape(channels: int, rank: int, lead: bool) -> list[int]:
    """Per-channel constant shape on axis 1 of a rank-`rank` tensor: [C, 1, ...], or [1, C, 1, ...]."""
    return ([1] if lead else []) + [channels] + [1] * (rank - 2)


def fold_and_check(g: G, out: str, names, into: str, how: str, ops):
    """Make `out` the graph output, fold, check that the chain `names` folded
    `how` into `into`, that the graph's ops are `ops`, and the numbers."""
    g.output(out)
    model = g.model()
    folded, report = affine_fold(model)
    assert_chain_folded(folded, report, names, into, how)
    assert op_types(folded) == ops
    assert_same_outputs(model, folded, g.feeds)


def op_types(model) -> list[str]:
    """The op types of `model`'s nodes, Constant nodes left out."""
    return [n.op_type for n in model.graph.node if n.op_type != "Constant"]


def assert_chain_folded(folded, report, names, into: str, how: str):
    for name in names:
        changes = changes_for(report, name)
        assert [(c.into, c.how) for c in changes] == [(into, how)], (name, report.changes, report.skipped)
        assert not skips_for(report, name), report.skipped
    left = set(names) & {n.name for n in folded.graph.node}
    assert not left, f"chain nodes left: {left}"


# ---------------------------------------------------------------- backward
@given(seed=seeds, geo=conv_geometry(), bias=st.booleans(), dtype=conv_dtypes, kinds=chains, source=sources,
       lead=st.booleans(), scalar=st.sets(st.integers(0, 2)))
def test_conv_then_chain_folds_backward(seed, geo, bias, dtype, kinds, source, lead, scalar):
    rank, cin, cout, group, kernel, strides, dilations, pads, spatial = geo
    g = G(dtype, rng=np.random.default_rng(seed))
    x = g.input([2, cin, *spatial])
    y = g.conv(x, cin, cout, kernel, group=group, bias=bias, strides=strides, dilations=dilations, pads=pads)
    out, names = apply_chain(g, y, kinds, channel_shape(cout, rank + 2, lead), source, scalar)
    g.output(g.op("Relu", [out]))
    model = g.model()
    folded, report = affine_fold(model)
    assert_chain_folded(folded, report, names, "Conv", "backward")
    assert count_op(folded, "Conv") == 1 and len(folded.graph.node) == 2
    assert_same_outputs(model, folded, g.feeds)


@given(seed=seeds, group=st.sampled_from([1, 2]), dtype=conv_dtypes, kinds=chains, data=st.data())
def test_conv_transpose_then_chain_folds_backward(seed, group, dtype, kinds, data):
    cin, cout = group * data.draw(st.integers(1, 2)), group * data.draw(st.integers(1, 3))
    g = G(dtype, rng=np.random.default_rng(seed))
    x = g.input([1, cin, 3, 4])
    y = g.conv_transpose(x, cin, cout, [2, 3], group=group, strides=[2, 1], bias=data.draw(st.booleans()))
    out, names = apply_chain(g, y, kinds, [cout, 1, 1], "init")
    fold_and_check(g, out, names, "ConvTranspose", "backward", ["ConvTranspose"])


@given(seed=seeds, m=st.integers(1, 4), k=st.integers(1, 5), n=st.integers(1, 5), trans_a=st.booleans(),
       trans_b=st.booleans(), alpha=st.sampled_from([1.0, -2.0]), beta=st.sampled_from([1.0, 0.0, 0.7]),
       c_shape=st.sampled_from(["none", "scalar", "[N]", "[M,N]"]), dtype=dtypes, kinds=chains,
       shape=st.sampled_from(["[N]", "[1,N]", "scalar"]))
def test_gemm_then_chain_folds_backward(seed, m, k, n, trans_a, trans_b, alpha, beta, c_shape, dtype, kinds, shape):
    g = G(dtype, rng=np.random.default_rng(seed))
    a = g.input([k, m] if trans_a else [m, k])
    make_c = gemm_c(g, c_shape, m, n)
    ins = [a, g.const(g.randn([n, k] if trans_b else [k, n]))] + ([make_c()] if make_c else [])
    y = g.op("Gemm", ins, alpha=alpha, beta=beta, transA=int(trans_a), transB=int(trans_b))
    out, names = apply_chain(g, y, kinds, {"[N]": [n], "[1,N]": [1, n], "scalar": []}[shape], "init")
    fold_and_check(g, out, names, "Gemm", "backward", ["Gemm"])


@given(seed=seeds, lead=st.lists(st.integers(1, 3), max_size=2), k=st.integers(1, 5), n=st.integers(1, 5),
       bias=st.sampled_from(["none", "right", "left"]), dtype=dtypes, kinds=chains, source=sources)
def test_matmul_then_chain_folds_backward(seed, lead, k, n, bias, dtype, kinds, source):
    """Layer scale: [..., K] @ [K, N] (+ b), then per-feature steps on the last axis."""
    g = G(dtype, rng=np.random.default_rng(seed))
    x = g.input([*lead, 2, k])
    y = g.op("MatMul", [x, g.const(g.randn([k, n]))])
    if bias != "none":
        b = g.const(g.randn([n]))
        y = g.op("Add", [b, y] if bias == "left" else [y, b])
    out, names = apply_chain(g, y, kinds, [n], source)
    g.output(out)
    model = g.model()
    folded, report = affine_fold(model)
    if bias == "none" and kinds[0] in ("add", "add_l"):  # the first Add is the MatMul's bias: it takes the rest
        assert not changes_for(report, names[0]) and not skips_for(report, names[0])
        names = names[1:]
        if not names:  # nothing else to fold
            assert [n.op_type for n in folded.graph.node] == [n.op_type for n in model.graph.node]
            return
    assert_chain_folded(folded, report, names, "MatMul", "backward")
    assert op_types(folded) == ["MatMul", "Add"]
    assert_same_outputs(model, folded, g.feeds)


# ----------------------------------------------------------------- forward
@given(seed=seeds, geo=conv_geometry(), bias=st.booleans(), dtype=conv_dtypes, kinds=chains, source=sources,
       lead=st.booleans())
def test_chain_then_conv_folds_forward_or_partially(seed, geo, bias, dtype, kinds, source, lead):
    """Input standardisation: unpadded conv takes the whole chain; a padded conv
    takes the scale, and the shift stays as one Add (unless there is none)."""
    rank, cin, cout, group, kernel, strides, dilations, pads, spatial = geo
    g = G(dtype, rng=np.random.default_rng(seed))
    x = g.input([2, cin, *spatial])
    h, names = apply_chain(g, x, kinds, channel_shape(cin, rank + 2, lead), source)
    g.output(g.conv(h, cin, cout, kernel, group=group, bias=bias, strides=strides, dilations=dilations, pads=pads))
    model = g.model()
    folded, report = affine_fold(model)
    shifts = any(k not in ("mul", "mul_l", "div") for k in kinds)
    if any(pads) and shifts:
        if len(kinds) == 1:  # a lone shift: nothing would be saved
            assert not report.changes and "pad" in skips_for(report, names[0])[0].reason
            return
        assert_chain_folded(folded, report, names, "Conv", "partial")
        assert op_types(folded) == ["Add", "Conv"]
    else:
        assert_chain_folded(folded, report, names, "Conv", "forward")
        assert op_types(folded) == ["Conv"]
    assert_same_outputs(model, folded, g.feeds)


@given(seed=seeds, group=st.sampled_from([1, 2]), dtype=conv_dtypes, kinds=chains, data=st.data())
def test_chain_then_conv_transpose_folds_its_scale(seed, group, dtype, kinds, data):
    """A ConvTranspose takes the scale exactly; a shift stays as one Add (a chain
    that only shifts, alone, is left)."""
    cin, cout = group * data.draw(st.integers(1, 2)), group * data.draw(st.integers(1, 3))
    g = G(dtype, rng=np.random.default_rng(seed))
    x = g.input([1, cin, 3, 4])
    h, names = apply_chain(g, x, kinds, [cin, 1, 1], "init")
    y = g.conv_transpose(h, cin, cout, [2, 3], group=group, strides=[2, 1], pads=data.draw(
        st.sampled_from([[0, 0, 0, 0], [0, 1, 0, 1]])), bias=data.draw(st.booleans()))
    if all(k in ("mul", "mul_l", "div") for k in kinds):
        fold_and_check(g, y, names, "ConvTranspose", "forward", ["ConvTranspose"])
    elif len(kinds) > 1:
        fold_and_check(g, y, names, "ConvTranspose", "partial", ["Add", "ConvTranspose"])
    else:
        g.output(y)
        folded, report = affine_fold(g.model())
        assert not report.changes and "spreads" in skips_for(report, names[0])[0].reason


@given(seed=seeds, m=st.integers(1, 4), k=st.integers(1, 5), n=st.integers(1, 5), trans_b=st.booleans(),
       alpha=st.sampled_from([1.0, 0.5]), beta=st.sampled_from([1.0, 0.0, 0.7]),
       c_shape=st.sampled_from(["none", "[N]", "[M,N]"]), dtype=dtypes, kinds=chains)
def test_chain_then_gemm_folds_forward(seed, m, k, n, trans_b, alpha, beta, c_shape, dtype, kinds):
    g = G(dtype, rng=np.random.default_rng(seed))
    a = g.input([m, k])
    h, names = apply_chain(g, a, kinds, [k], "init")
    make_c = gemm_c(g, c_shape, m, n)
    ins = [h, g.const(g.randn([n, k] if trans_b else [k, n]))] + ([make_c()] if make_c else [])
    fold_and_check(g, g.op("Gemm", ins, alpha=alpha, beta=beta, transB=int(trans_b)), names, "Gemm", "forward",
                   ["Gemm"])


@given(seed=seeds, lead=st.lists(st.integers(1, 3), max_size=2), k=st.integers(1, 5), n=st.integers(1, 5),
       dtype=dtypes, kinds=chains, bias=st.booleans())
def test_chain_then_matmul_folds_forward(seed, lead, k, n, dtype, kinds, bias):
    """The shift becomes the MatMul's bias Add (merged into the bias it had)."""
    g = G(dtype, rng=np.random.default_rng(seed))
    x = g.input([*lead, 2, k])
    h, names = apply_chain(g, x, kinds, [k], "init")
    y = g.op("MatMul", [h, g.const(g.randn([k, n]))])
    if bias:
        y = g.op("Add", [y, g.const(g.randn([n]))])
    g.output(y)
    model = g.model()
    folded, report = affine_fold(model)
    assert_chain_folded(folded, report, names, "MatMul", "forward")
    shifts = any(k not in ("mul", "mul_l", "div") for k in kinds)
    assert op_types(folded) == ["MatMul", "Add"] if bias or shifts else ["MatMul"]
    assert_same_outputs(model, folded, g.feeds)


@given(seed=seeds, geo=conv_geometry(padded=True), dtype=st.sampled_from([np.float32, np.float16]),
       kinds=st.lists(st.sampled_from(STEP_KINDS), max_size=2), after=st.booleans())
def test_bn_with_chain_before_padded_conv_folds_scale_only(seed, geo, dtype, kinds, after):
    """A BN (with steps before or after it) that fold-bn must keep before a
    padded conv: its scale goes into the weights, one Add is left."""
    rank, cin, cout, group, kernel, strides, dilations, pads, spatial = geo
    pads[0] = max(pads[0], 1)
    g = G(dtype, rng=np.random.default_rng(seed))
    x = g.input([1, cin, *spatial])
    gamma, beta, mean, var = bn_params(g.rng, cin)
    shape = channel_shape(cin, rank + 2, False)
    h, before = apply_chain(g, x, [] if after else kinds, shape, "init")
    h, bn = g.bn(h, cin, params=(gamma, beta + np.sign(beta) + 0.5, np.zeros(cin), var))
    h, behind = apply_chain(g, h, kinds if after else [], shape, "init")
    g.output(g.conv(h, cin, cout, kernel, group=group, strides=strides, dilations=dilations, pads=pads))
    model = g.model()
    bn_folded, _ = fold(model)
    assert count_op(bn_folded, "BatchNormalization") == 1  # fold-bn keeps it
    folded, report = affine_fold(model)
    assert_chain_folded(folded, report, before + [bn] + behind, "Conv", "partial")
    assert op_types(folded) == ["Add", "Conv"]
    assert node_names(folded, "Add") and count_op(folded, "BatchNormalization") == 0
    assert_same_outputs(model, folded, g.feeds)

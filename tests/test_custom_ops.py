"""The com.normfold CPU kernels against the PyTorch layers they implement.

Every model here is one custom-op node run through `normfold.runtime.session.make_session`.
References are computed by PyTorch in float64 from the same (rounded) inputs;
fp32 results must be within 1e-5 of the output scale, fp16 results within one
fp16 rounding step. These tests fail (not skip) when the library is not built:
the set-up command builds it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from normfold.ops.library import cpu_loops, ops_library_path
from normfold.ops.table import DOMAIN
from normfold.runtime.session import make_session

ONNX_TYPES = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16, np.float64: TensorProto.DOUBLE}


def one_node(op: str, inputs: dict, attrs: dict | None = None, *, static: bool = True, dtype=np.float32,
             compute_type: int | None = None):
    """A model with one com.normfold `op` node on `inputs` (name -> array; None = optional input left
    out; a None before a given input becomes the empty name '').
    `static=False` declares every input shape unknown; `compute_type` wraps the node in Casts
    (e.g. to run the bfloat16 kernel from float32 inputs)."""
    elem = ONNX_TYPES[dtype]
    present = {k: v for k, v in inputs.items() if v is not None}
    graph_inputs = [helper.make_tensor_value_info(k, elem, list(v.shape) if static else None) for k, v in present.items()]
    nodes, names = [], []
    for name in inputs:
        if inputs[name] is None:
            names.append("")
        elif compute_type is None:
            names.append(name)
        else:
            nodes.append(helper.make_node("Cast", [name], [name + "_c"], to=compute_type))
            names.append(name + "_c")
    while names and names[-1] == "":
        names.pop()
    out = "Y" if compute_type is None else "Y_c"
    nodes.append(helper.make_node(op, names, [out], domain=DOMAIN, **(attrs or {})))
    if compute_type is not None:
        nodes.append(helper.make_node("Cast", ["Y_c"], ["Y"], to=elem))
    graph = helper.make_graph(nodes, op, graph_inputs, [helper.make_tensor_value_info("Y", elem, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])
    model.ir_version = 10
    return model


def run(op: str, inputs: dict, attrs: dict | None = None, threads: int = 2, **kwargs) -> np.ndarray:
    """Run one_node(...) on the CPU provider and return Y."""
    session = make_session(one_node(op, inputs, attrs, **kwargs), threads=threads)
    return session.run(None, {k: v for k, v in inputs.items() if v is not None})[0]


def t64(a):
    return None if a is None else torch.from_numpy(np.asarray(a, dtype=np.float64))


# ---- references (float64 PyTorch)

def ref_group_norm(x, scale, bias, num_groups, epsilon=1e-5, activation="none"):
    y = torch.group_norm(t64(x), num_groups, t64(scale), t64(bias), epsilon)  # F.group_norm refuses 1 value per group
    return (F.silu(y) if activation == "silu" else y).numpy()


def ref_layer_norm(x, scale, bias, axis=-1, epsilon=1e-5, channel_first=0):
    x = t64(x)
    if channel_first:  # ConvNeXt LayerNorm2d: normalize over C only
        moved = x.movedim(1, -1)
        return F.layer_norm(moved, moved.shape[-1:], t64(scale), t64(bias), epsilon).movedim(-1, 1).numpy()
    shape = x.shape[axis:]
    bias = None if bias is None else t64(bias).reshape(shape)
    return F.layer_norm(x, shape, t64(scale).reshape(shape), bias, epsilon).numpy()


def ref_rms_norm(x, scale, axis=-1, epsilon=None):
    x = t64(x)
    shape = x.shape[axis:]
    return F.rms_norm(x, shape, None if scale is None else t64(scale).reshape(shape), epsilon).numpy()


def ref_frn(x, gamma, beta, tau, epsilon=1e-6, use_tlu=1):
    x = t64(x)
    view = (1, -1) + (1,) * (x.dim() - 2)
    nu2 = x.pow(2).mean(dim=tuple(range(2, x.dim())), keepdim=True) if x.dim() > 2 else x.pow(2)
    y = t64(gamma).reshape(view) * x * torch.rsqrt(nu2 + abs(epsilon)) + t64(beta).reshape(view)
    return (torch.maximum(y, t64(tau).reshape(view)) if use_tlu else y).numpy()


def ref_weight_norm(v, g, dim=0):
    v = t64(v)
    g = t64(g).reshape([-1 if i == dim else 1 for i in range(v.dim())])
    return torch._weight_norm(v, g, dim).numpy()


def assert_close(y: np.ndarray, ref: np.ndarray, dtype=np.float32) -> None:
    """fp32/fp64: within 1e-5 of the output scale; fp16: within one fp16 rounding step (+1e-5 of scale)."""
    assert y.shape == ref.shape and y.dtype == np.dtype(dtype)
    scale = max(1.0, float(np.abs(ref).max(initial=0.0)))
    err = np.abs(y.astype(np.float64) - ref)
    if dtype == np.float16:
        allowed = np.spacing(np.abs(ref).astype(np.float16)).astype(np.float64) + 1e-5 * scale
    else:
        allowed = np.full(ref.shape, (1e-5 if dtype == np.float32 else 1e-12) * scale)
    worst = np.unravel_index(np.argmax(err - allowed), err.shape) if err.size else ()
    assert np.all(err <= allowed), f"max error {err[worst]} > {allowed[worst]} at {worst}"


def test_library_is_built():
    assert ops_library_path() is not None, "custom-op library not built; normfold doctor says how to build it"


# ---- GroupNorm

@settings(max_examples=40)
@given(batch=st.integers(1, 3), groups=st.integers(1, 4), per_group=st.integers(1, 5),
       spatial=st.lists(st.integers(1, 9), min_size=0, max_size=3), offset=st.sampled_from([0.0, 1000.0]),
       epsilon=st.sampled_from([1e-8, 1e-5, 0.1, 10.0]), activation=st.sampled_from(["none", "silu"]),
       seed=st.integers(0, 2**16))
def test_group_norm_matches_torch(batch, groups, per_group, spatial, offset, epsilon, activation, seed):
    rng = np.random.default_rng(seed)
    c = groups * per_group
    x = (rng.standard_normal((batch, c, *spatial)) * 3 + offset).astype(np.float32)
    scale, bias = rng.standard_normal(c).astype(np.float32), rng.standard_normal(c).astype(np.float32)
    attrs = dict(num_groups=groups, epsilon=epsilon, activation=activation)
    y = run("GroupNorm", dict(X=x, scale=scale, bias=bias), attrs)
    assert_close(y, ref_group_norm(x, scale, bias, groups, epsilon, activation))


@pytest.mark.parametrize("shape,groups", [((1, 32, 64, 64), 2), ((2, 64, 33, 31), 32), ((1, 8, 4, 8, 9), 1),
                                          ((3, 12, 4000), 3)])
@pytest.mark.parametrize("threads", [1, 2])
def test_group_norm_large_instances_and_threads(shape, groups, threads, rng):
    x = (rng.standard_normal(shape) + 1000).astype(np.float32)
    scale, bias = rng.standard_normal(shape[1]).astype(np.float32), rng.standard_normal(shape[1]).astype(np.float32)
    y = run("GroupNorm", dict(X=x, scale=scale, bias=bias), dict(num_groups=groups), threads=threads)
    assert_close(y, ref_group_norm(x, scale, bias, groups))


@settings(max_examples=25, deadline=None)
@given(means=st.lists(st.sampled_from([0.0, 1.0, -250.0, 3000.0, 1e4]), min_size=1, max_size=4),
       width=st.integers(700, 5000), std=st.sampled_from([1e-2, 1.0, 30.0]), seed=st.integers(0, 2**16))
def test_group_norm_statistics_across_blocks_of_channels_far_apart(means, width, std, seed):
    """One group whose channels have their own means: the statistics run over blocks of 1024 values, the later
    ones against the running mean, which can sit far from a block's own (a first channel at 0, the next at 1e4)."""
    rng = np.random.default_rng(seed)
    x = (np.array(means)[None, :, None] + std * rng.standard_normal((2, len(means), width))).astype(np.float32)
    scale, bias = rng.standard_normal(len(means)).astype(np.float32), rng.standard_normal(len(means)).astype(np.float32)
    y = run("GroupNorm", dict(X=x, scale=scale, bias=bias), dict(num_groups=1), threads=1)
    assert_close(y, ref_group_norm(x, scale, bias, 1))


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
@pytest.mark.parametrize("activation", ["none", "silu"])
def test_group_norm_fp16_fp64(dtype, activation, rng):
    x = (rng.standard_normal((2, 6, 7, 5)) * 2 + 3).astype(dtype)
    scale, bias = rng.standard_normal(6).astype(dtype), rng.standard_normal(6).astype(dtype)
    y = run("GroupNorm", dict(X=x, scale=scale, bias=bias), dict(num_groups=3, activation=activation), dtype=dtype)
    assert_close(y, ref_group_norm(x, scale, bias, 3, activation=activation), dtype)


def test_bfloat16_kernels_run(rng):
    """bf16 kernels, reached through Casts: within bf16 rounding of the fp32 result."""
    x = rng.standard_normal((2, 8, 5, 5)).astype(np.float32)
    scale, bias = np.ones(8, np.float32), np.zeros(8, np.float32)
    y = run("GroupNorm", dict(X=x, scale=scale, bias=bias), dict(num_groups=2), compute_type=TensorProto.BFLOAT16)
    np.testing.assert_allclose(y, ref_group_norm(x, scale, bias, 2), atol=0.05, rtol=0.02)


# ---- LayerNorm

@settings(max_examples=40)
@given(shape=st.lists(st.integers(1, 9), min_size=1, max_size=4), data=st.data(), offset=st.sampled_from([0.0, 1000.0]),
       epsilon=st.sampled_from([1e-8, 1e-5, 1.0]), with_bias=st.booleans(), seed=st.integers(0, 2**16))
def test_layer_norm_last_axes_matches_torch(shape, data, offset, epsilon, with_bias, seed):
    rng = np.random.default_rng(seed)
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    x = (rng.standard_normal(shape) * 2 + offset).astype(np.float32)
    pshape = x.shape[axis:]
    scale = rng.standard_normal(pshape).astype(np.float32)
    bias = rng.standard_normal(pshape).astype(np.float32) if with_bias else None
    y = run("LayerNorm", dict(X=x, scale=scale, bias=bias), dict(axis=axis, epsilon=epsilon))
    assert_close(y, ref_layer_norm(x, scale, bias, axis, epsilon))


@settings(max_examples=40)
@given(batch=st.integers(1, 3), channels=st.integers(1, 70), spatial=st.lists(st.integers(1, 40), min_size=0, max_size=3),
       offset=st.sampled_from([0.0, 1000.0]), epsilon=st.sampled_from([1e-6, 1e-5, 1.0]), seed=st.integers(0, 2**16))
def test_layer_norm_channel_first_matches_torch(batch, channels, spatial, offset, epsilon, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((batch, channels, *spatial)) + offset).astype(np.float32)
    scale, bias = rng.standard_normal(channels).astype(np.float32), rng.standard_normal(channels).astype(np.float32)
    y = run("LayerNorm", dict(X=x, scale=scale, bias=bias), dict(channel_first=1, epsilon=epsilon))
    assert_close(y, ref_layer_norm(x, scale, bias, epsilon=epsilon, channel_first=1))


@settings(max_examples=30)
@given(channels=st.integers(2, 40), width=st.integers(1, 300), outlier=st.sampled_from([1e2, -1e4, 3e4]),
       first_is_outlier=st.booleans(), spread=st.sampled_from([1e-3, 1.0]), seed=st.integers(0, 2**16))
def test_layer_norm_channel_first_with_outlier_channels(channels, width, outlier, first_is_outlier, spread, seed):
    """Channels far from the others (ConvNeXt's massive activations), channel 0 among them or not: the
    statistics shift by channel 0's value, so its distance from the mean must not cost accuracy."""
    rng = np.random.default_rng(seed)
    offsets = np.zeros(channels)
    offsets[0 if first_is_outlier else channels - 1] = outlier
    x = (rng.standard_normal((2, channels, width)) * spread + offsets[None, :, None] + 7).astype(np.float32)
    scale, bias = rng.standard_normal(channels).astype(np.float32), rng.standard_normal(channels).astype(np.float32)
    y = run("LayerNorm", dict(X=x, scale=scale, bias=bias), dict(channel_first=1))
    assert_close(y, ref_layer_norm(x, scale, bias, channel_first=1))


@pytest.mark.parametrize("shape,attrs", [((2, 96, 56, 56), dict(channel_first=1)), ((1, 1000, 3, 7), dict(channel_first=1)),
                                         ((1, 8, 96, 96), dict(channel_first=1)),  # blocks of > 1024 positions
                                         ((4, 128, 3072), dict(axis=-1)), ((1, 4, 128, 512), dict(axis=1))])
def test_layer_norm_large(shape, attrs, rng):
    x = (rng.standard_normal(shape) - 500).astype(np.float32)
    n = shape[1] if attrs.get("channel_first") else int(np.prod(shape[attrs["axis"]:]))
    scale, bias = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    y = run("LayerNorm", dict(X=x, scale=scale, bias=bias), attrs)
    assert_close(y, ref_layer_norm(x, scale, bias, axis=attrs.get("axis", -1), channel_first=attrs.get("channel_first", 0)))


@pytest.mark.parametrize("channel_first", [0, 1])
def test_layer_norm_fp16(channel_first, rng):
    x = (rng.standard_normal((2, 24, 9, 11)) * 4 + 10).astype(np.float16)
    n = 24 if channel_first else 11
    scale, bias = rng.standard_normal(n).astype(np.float16), rng.standard_normal(n).astype(np.float16)
    y = run("LayerNorm", dict(X=x, scale=scale, bias=bias), dict(channel_first=channel_first), dtype=np.float16)
    assert_close(y, ref_layer_norm(x, scale, bias, channel_first=channel_first), np.float16)


# ---- RMSNorm

@settings(max_examples=40)
@given(shape=st.lists(st.integers(1, 9), min_size=1, max_size=4), data=st.data(), scale_mode=st.sampled_from(["scale", "none"]),
       epsilon=st.sampled_from([None, 1e-8, 1e-6, 1.0]), offset=st.sampled_from([0.0, 1000.0]), seed=st.integers(0, 2**16))
def test_rms_norm_matches_torch(shape, data, scale_mode, epsilon, offset, seed):
    rng = np.random.default_rng(seed)
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    x = (rng.standard_normal(shape) + offset).astype(np.float32)
    scale = rng.standard_normal(x.shape[axis:]).astype(np.float32) if scale_mode == "scale" else None
    attrs = dict(axis=axis) if epsilon is None else dict(axis=axis, epsilon=epsilon)
    y = run("RMSNorm", dict(X=x, scale=scale), attrs)
    ref_eps = float(np.finfo(np.float32).eps) if epsilon is None else epsilon
    assert_close(y, ref_rms_norm(x, scale, axis, ref_eps))


def test_rms_norm_large_and_fp16(rng):
    x = rng.standard_normal((8, 64, 1024)).astype(np.float32)
    scale = rng.standard_normal(1024).astype(np.float32)
    assert_close(run("RMSNorm", dict(X=x, scale=scale), dict(epsilon=1e-6)), ref_rms_norm(x, scale, -1, 1e-6))
    xh, sh = x[:2, :5].astype(np.float16), scale.astype(np.float16)
    y = run("RMSNorm", dict(X=xh, scale=sh), dict(epsilon=1e-6), dtype=np.float16)
    assert_close(y, ref_rms_norm(xh, sh, -1, 1e-6), np.float16)


# ---- FilterResponseNorm

@settings(max_examples=40)
@given(batch=st.integers(1, 3), channels=st.integers(1, 9), spatial=st.lists(st.integers(1, 12), min_size=0, max_size=3),
       epsilon=st.sampled_from([1e-6, -1e-3, 1.0]), use_tlu=st.sampled_from([0, 1]), param_shape=st.sampled_from(["c", "1c11"]),
       seed=st.integers(0, 2**16))
def test_frn_matches_reference(batch, channels, spatial, epsilon, use_tlu, param_shape, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((batch, channels, *spatial)) * 3).astype(np.float32)
    shape = (channels,) if param_shape == "c" else (1, channels, 1, 1)
    gamma, beta, tau = (rng.standard_normal(shape).astype(np.float32) for _ in range(3))
    y = run("FilterResponseNorm", dict(X=x, gamma=gamma, beta=beta, tau=tau), dict(epsilon=epsilon, use_tlu=use_tlu))
    assert_close(y, ref_frn(x, gamma, beta, tau, epsilon, use_tlu))


def test_frn_large_fp16_and_without_tau(rng):
    x = rng.standard_normal((2, 16, 96, 96)).astype(np.float32)
    gamma, beta, tau = (rng.standard_normal(16).astype(np.float32) for _ in range(3))
    assert_close(run("FilterResponseNorm", dict(X=x, gamma=gamma, beta=beta, tau=tau)), ref_frn(x, gamma, beta, tau))
    y = run("FilterResponseNorm", dict(X=x, gamma=gamma, beta=beta, tau=None), dict(use_tlu=0))
    assert_close(y, ref_frn(x, gamma, beta, tau, use_tlu=0))
    xh, gh, bh, th = (a.astype(np.float16) for a in (x[:, :, :9, :7], gamma, beta, tau))
    y = run("FilterResponseNorm", dict(X=xh, gamma=gh, beta=bh, tau=th), dtype=np.float16)
    assert_close(y, ref_frn(xh, gh, bh, th), np.float16)


# ---- WeightNorm

@settings(max_examples=30)
@given(shape=st.lists(st.integers(1, 7), min_size=1, max_size=4), data=st.data(), seed=st.integers(0, 2**16))
def test_weight_norm_matches_torch(shape, data, seed):
    rng = np.random.default_rng(seed)
    dim = data.draw(st.integers(0, len(shape) - 1))
    v = rng.standard_normal(shape).astype(np.float32)
    g = rng.standard_normal([n if i == dim else 1 for i, n in enumerate(shape)]).astype(np.float32)
    assert_close(run("WeightNorm", dict(V=v, g=g), dict(dim=dim)), ref_weight_norm(v, g, dim))


@pytest.mark.parametrize("shape,dim", [((3, 100_003), 0),  # few long rows: each split across tasks
                                       ((2048, 1024, 1, 1), 0), ((2, 5, 40_000), 1), ((64, 3, 3, 7), 3)])
def test_weight_norm_large(shape, dim, rng):
    v = rng.standard_normal(shape).astype(np.float32)
    g = rng.standard_normal([n if i == dim else 1 for i, n in enumerate(shape)]).astype(np.float32)
    assert_close(run("WeightNorm", dict(V=v, g=g), dict(dim=dim)), ref_weight_norm(v, g, dim))


def test_weight_norm_fp16(rng):
    v, g = rng.standard_normal((16, 8, 3, 3)).astype(np.float16), rng.standard_normal(16).astype(np.float16)
    assert_close(run("WeightNorm", dict(V=v, g=g), dtype=np.float16), ref_weight_norm(v, g), np.float16)


# ---- the fused SiLU: accuracy over every float range, extremes included

SILU_FLUSH = -88.37  # below, |SiLU(x)| < 4e-37 and the kernel returns -0 (custom_ops/src/activation_math.h)


def silu_inputs() -> np.ndarray:
    """A dense range, every power-of-two scale up to FLT_MAX, both signs, the cut-offs and the specials."""
    f32 = np.finfo(np.float32)
    dense = np.linspace(-100, 100, 400_001, dtype=np.float32)
    scales = np.geomspace(float(f32.smallest_subnormal), float(f32.max), 60_000).astype(np.float32)
    edges = np.array([0, f32.smallest_normal, 87.33, 87.34, 88.37, 88.38, 88.72, 88.73, 103.9, 104, 1e10, f32.max],
                     np.float32)
    edges = np.concatenate([edges, np.nextafter(edges[:-1], np.float32(np.inf)), np.nextafter(edges, np.float32(0))])
    magnitudes = np.concatenate([dense, scales, edges])
    return np.concatenate([magnitudes, -magnitudes, [np.nan]]).astype(np.float32)


def silu_via_group_norm(values: np.ndarray, activation: str = "silu") -> np.ndarray:
    """The kernel's SiLU of exactly `values` (and of +inf, -inf): one GroupNorm instance per channel of
    X = [1, -1] (mean 0, variance 1, epsilon 0: normalized ±1), scale = value, bias = 0 (pre-activation
    ±value, exact); +inf and -inf come from FLT_MAX ± FLT_MAX. Returns the activation of
    [values, -values, +inf, -inf]."""
    big = np.finfo(np.float32).max
    scale = np.concatenate([values, [big, big]]).astype(np.float32)
    bias = np.concatenate([np.zeros_like(values), [big, -big]]).astype(np.float32)
    x = np.tile(np.array([1, -1], np.float32), (1, len(scale), 1))
    y = run("GroupNorm", dict(X=x, scale=scale, bias=bias), dict(num_groups=len(scale), epsilon=0.0, activation=activation))
    return np.concatenate([y[0, :-2, 0], y[0, :-2, 1], [y[0, -2, 0], y[0, -1, 1]]])


def ref_silu(x: np.ndarray) -> np.ndarray:
    """x / (1 + exp(-x)) in float64, with its limits at ±inf."""
    x = x.astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        y = x / (1 + np.exp(-x))
    return np.where(x == -np.inf, -0.0, y)


def test_silu_pre_activation_is_exact():
    """The harness of the SiLU tests: with activation='none' the kernel returns exactly ±value and ±inf."""
    v = silu_inputs()
    y = silu_via_group_norm(v, activation="none")
    expected = np.concatenate([v, -v, [np.inf, -np.inf]])
    assert np.array_equal(y, expected, equal_nan=True)


def test_silu_accuracy_against_float64():
    v = silu_inputs()
    x = np.concatenate([v, -v, [np.inf, -np.inf]]).astype(np.float32)
    y, ref = silu_via_group_norm(v).astype(np.float64), ref_silu(x)
    nan = np.isnan(x)
    assert np.isnan(y[nan]).all(), "SiLU(NaN) must be NaN"
    assert not np.isnan(y[~nan]).any(), f"NaN for inputs {x[~nan][np.isnan(y[~nan])][:5]}"
    assert y[x == np.inf][0] == np.inf and y[x == -np.inf][0] == 0 and np.signbit(y[x == -np.inf][0])
    flushed = x < np.float32(SILU_FLUSH)
    assert np.all(y[flushed] == 0) and np.all(np.signbit(y[flushed])) and np.all(np.abs(ref[flushed]) < 4e-37)
    kept = ~flushed & ~nan & np.isfinite(x)
    err = np.abs(y[kept] - ref[kept])
    allowed = 3e-7 * np.abs(ref[kept]) + 2.0 ** -149  # relative, and half the denormal step (results of tiny x)
    worst = np.argmax(err - allowed)
    assert np.all(err <= allowed), f"SiLU({x[kept][worst]!r}) = {y[kept][worst]!r}, float64 {ref[kept][worst]!r}"


@pytest.mark.parametrize("shape,groups", [((2, 128, 64, 64), 32), ((3, 20, 7, 9), 5), ((1, 64, 4001), 8)])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_group_norm_silu_models_match_torch(shape, groups, dtype, rng):
    """GN+SiLU (odd sizes: vector tails) against PyTorch in float64, and against PyTorch's own fp32 kernels."""
    x = (rng.standard_normal(shape) * 4 + 2).astype(dtype)
    scale, bias = (rng.standard_normal(shape[1]) * 3).astype(dtype), rng.standard_normal(shape[1]).astype(dtype)
    y = run("GroupNorm", dict(X=x, scale=scale, bias=bias), dict(num_groups=groups, activation="silu"), dtype=dtype)
    assert_close(y, ref_group_norm(x, scale, bias, groups, activation="silu"), dtype)
    if dtype == np.float32:
        torch32 = F.silu(F.group_norm(torch.from_numpy(x), groups, torch.from_numpy(scale), torch.from_numpy(bias)))
        np.testing.assert_allclose(y, torch32.numpy(), rtol=1e-5, atol=1e-5)


# ---- every copy of the hot loops (AVX-512, AVX2, baseline x86-64; NORMFOLD_LOOPS caps it) gives the same bits

LOOP_COPIES = ["baseline", "avx2", "avx512"]  # narrowest first


def in_subprocess(script: str, loops: str) -> subprocess.CompletedProcess:
    """Run `script` in a fresh Python with NORMFOLD_LOOPS=loops (the library picks its loops once per process)."""
    done = subprocess.run([sys.executable, "-c", script], env={**os.environ, "NORMFOLD_LOOPS": loops},
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
    assert done.returncode == 0, f"with NORMFOLD_LOOPS={loops}: {done.stderr.strip().splitlines()[-1:]}"
    return done


def loop_outputs() -> dict[str, np.ndarray]:
    """One run of every CPU loop (odd sizes: vector tails), large means included; `long` has groups of
    several statistics blocks (kBlock = 1024) and a partial last one. Names with "silu" hold a fused SiLU."""
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((2, 24, 13, 11)) * 3 + 100).astype(np.float32)
    long = (rng.standard_normal((1, 4, 50, 61)) * 2 - 30).astype(np.float32)
    c, d = rng.standard_normal(24).astype(np.float32), rng.standard_normal(11).astype(np.float32)
    v = rng.standard_normal((24, 5, 3, 3)).astype(np.float32)
    skip, e = rng.standard_normal(long.shape).astype(np.float32), rng.standard_normal(61).astype(np.float32)
    h = {k: a.astype(np.float16) for k, a in dict(long=long, c=c[:4], x=x, c24=c, skip=skip, e=e).items()}
    return {
        "GroupNorm": run("GroupNorm", dict(X=x, scale=c, bias=c), dict(num_groups=4)),
        "GroupNorm silu": run("GroupNorm", dict(X=x, scale=c, bias=c), dict(num_groups=4, activation="silu")),
        "GroupNorm long": run("GroupNorm", dict(X=long, scale=c[:4], bias=c[:4]), dict(num_groups=2)),
        "GroupNorm long fp16 silu": run("GroupNorm", dict(X=h["long"], scale=h["c"], bias=h["c"]),
                                        dict(num_groups=2, activation="silu"), dtype=np.float16),
        "FilterResponseNorm tlu": run("FilterResponseNorm", dict(X=x, gamma=c, beta=c, tau=c), dict(use_tlu=1)),
        "LayerNorm channel-first": run("LayerNorm", dict(X=x, scale=c, bias=c), dict(channel_first=1)),
        "LayerNorm": run("LayerNorm", dict(X=x, scale=d, bias=d), dict(axis=-1)),
        "RMSNorm": run("RMSNorm", dict(X=x, scale=d), dict(epsilon=1e-6)),
        "FilterResponseNorm": run("FilterResponseNorm", dict(X=x, gamma=c, beta=c, tau=c)),
        "WeightNorm": run("WeightNorm", dict(V=v, g=c)),
        "LayerNorm fp64": run("LayerNorm", dict(X=x.astype(np.float64), scale=d.astype(np.float64),
                                                bias=d.astype(np.float64)), dtype=np.float64),
        "LayerNorm channel-first fp16": run("LayerNorm", dict(X=h["x"], scale=h["c24"], bias=h["c24"]),
                                            dict(channel_first=1), dtype=np.float16),
        "SkipLayerNorm": run("SkipLayerNorm", dict(X=long, skip=skip, scale=e, bias=e), dict(epsilon=1e-5)),
        "SkipRMSNorm": run("SkipRMSNorm", dict(X=long, skip=skip, scale=e), dict(epsilon=1e-6)),
        "SkipRMSNorm fp16": run("SkipRMSNorm", dict(X=h["long"], skip=h["skip"], scale=h["e"]), dict(epsilon=1e-6),
                                dtype=np.float16),
        "silu": silu_via_group_norm(silu_inputs()),  # the SiLU polynomial over every range, NaN and infinities included
    }


def assert_same_silu(y: np.ndarray, widest: np.ndarray, what: str) -> None:
    """The baseline loops' SiLU (two roundings per multiply-add) against the fused one: both within 3e-7
    of float64, so within 6e-7 of each other (fp32), or one fp16 step; the same NaNs, infinities and zeros."""
    assert np.array_equal(np.isnan(y), np.isnan(widest)), what
    a, b = y.astype(np.float64), widest.astype(np.float64)
    finite = np.isfinite(b)
    assert np.array_equal(a[~finite & ~np.isnan(b)], b[~finite & ~np.isnan(b)]), what
    assert np.array_equal(a == 0, b == 0), what
    if y.dtype == np.float16:
        allowed = np.spacing(np.abs(widest).astype(np.float16)).astype(np.float64)
    else:
        allowed = 6e-7 * np.abs(b) + 2.0 ** -148
    err = np.abs(a[finite] - b[finite])
    assert np.all(err <= allowed[finite]), f"{what}: max difference {err.max()}"


def test_every_loop_copy_this_cpu_has_gives_the_same_bits(tmp_path):
    """The AVX2 and AVX-512 copies give the same bits everywhere; the baseline copy too, but for the fused
    SiLU (it has no FMA), which is within the bound of assert_same_silu."""
    widest = cpu_loops(ops_library_path())
    copies = LOOP_COPIES[: LOOP_COPIES.index(widest) + 1]
    if len(copies) < 2:
        pytest.skip("this CPU runs the baseline loops only: nothing to compare them with")
    outputs = {}
    for loops in copies:
        out = tmp_path / f"{loops}.npz"
        in_subprocess(f"import numpy as np; from tests.test_custom_ops import loop_outputs; "
                      f"np.savez({str(out)!r}, **loop_outputs())", loops)
        outputs[loops] = np.load(out)
    for loops in copies[:-1]:
        for key in outputs[widest].files:
            y, reference = outputs[loops][key], outputs[widest][key]
            if loops == "baseline" and "silu" in key:
                assert_same_silu(y, reference, f"{key}: {loops} against {widest}")
            else:
                assert y.tobytes() == reference.tobytes(), f"{key} differs between the {loops} and the {widest} loops"


@pytest.mark.parametrize("loops", ["baseline", "avx2"])
def test_silu_accuracy_of_the_narrower_loops(loops):
    """test_silu_accuracy_against_float64 with the loops capped (it runs the widest the CPU has)."""
    if LOOP_COPIES.index(cpu_loops(ops_library_path())) <= LOOP_COPIES.index(loops):
        pytest.skip(f"{loops} is the widest copy here: test_silu_accuracy_against_float64 covers it")
    in_subprocess("from tests.test_custom_ops import test_silu_accuracy_against_float64 as t; t()", loops)


@pytest.mark.parametrize("cap", LOOP_COPIES)
def test_normfold_loops_caps_the_copy_the_kernels_run(cap):
    widest = cpu_loops(ops_library_path())
    expected = LOOP_COPIES[min(LOOP_COPIES.index(cap), LOOP_COPIES.index(widest))]
    script = ("from normfold.ops.library import cpu_loops, ops_library_path; "
              "print(cpu_loops(ops_library_path()))")
    assert in_subprocess(script, cap).stdout.strip() == expected


# ---- buffers at any alignment: the write loops start with the elements before a 64-byte boundary

def run_at_offset(op: str, inputs: dict, attrs: dict, shift: int) -> np.ndarray:
    """Y of one_node(op, ...) with X and Y bound (IOBinding) `shift` floats past a 64-byte boundary."""
    session = make_session(one_node(op, inputs, attrs), threads=1)
    binding = session.io_binding()
    keep = []
    for name, value in inputs.items():
        buffer = np.zeros(value.size + 32, np.float32)
        start = (-buffer.ctypes.data % 64) // 4 + shift
        placed = buffer[start:start + value.size].reshape(value.shape)
        placed[...] = value
        keep.append(placed)
        binding.bind_cpu_input(name, placed)
    out = np.zeros(inputs["X"].size + 32, np.float32)
    start = (-out.ctypes.data % 64) // 4 + shift
    y = out[start:start + inputs["X"].size].reshape(inputs["X"].shape)
    binding.bind_output("Y", "cpu", 0, np.float32, list(y.shape), y.ctypes.data)
    session.run_with_iobinding(binding)
    assert not out[:start].any() and not out[start + y.size:].any(), "wrote outside Y"
    return y.copy()


@pytest.mark.parametrize("shift", [1, 3, 4, 13])
def test_outputs_do_not_depend_on_the_alignment_of_the_buffers(shift):
    rng = np.random.default_rng(shift)
    x = (rng.standard_normal((2, 8, 9, 31)) * 2 + 5).astype(np.float32)
    c, d = rng.standard_normal(8).astype(np.float32), rng.standard_normal(31).astype(np.float32)
    cases = [("GroupNorm", dict(X=x, scale=c, bias=c), dict(num_groups=4, activation="silu")),
             ("LayerNorm", dict(X=x, scale=c, bias=c), dict(channel_first=1)),
             ("LayerNorm", dict(X=x, scale=d, bias=d), dict(axis=-1)),
             ("RMSNorm", dict(X=x, scale=d), {}),
             ("FilterResponseNorm", dict(X=x, gamma=c, beta=c, tau=c), dict(use_tlu=1))]
    for op, inputs, attrs in cases:
        aligned = run_at_offset(op, inputs, attrs, 0)
        assert aligned.tobytes() == run_at_offset(op, inputs, attrs, shift).tobytes(), f"{op} {attrs}"
        assert np.isfinite(aligned).all()


# ---- shapes only known at run time, empty tensors

def test_dynamic_shapes_and_output_type(rng):
    x = rng.standard_normal((2, 4, 3)).astype(np.float16)
    scale, bias = np.ones(4, np.float16), np.zeros(4, np.float16)
    session = make_session(one_node("GroupNorm", dict(X=x, scale=scale, bias=bias), dict(num_groups=2), dtype=np.float16))
    assert session.get_outputs()[0].type == "tensor(float16)" and session.get_outputs()[0].shape == [2, 4, 3]
    y = run("GroupNorm", dict(X=x, scale=scale, bias=bias), dict(num_groups=2), static=False, dtype=np.float16)
    assert_close(y, ref_group_norm(x, scale, bias, 2), np.float16)


def test_empty_batch():
    x = np.zeros((0, 4, 3), np.float32)
    y = run("GroupNorm", dict(X=x, scale=np.ones(4, np.float32), bias=np.zeros(4, np.float32)), dict(num_groups=2))
    assert y.shape == (0, 4, 3)


# ---- bad attributes and shapes: a clear error, never a crash

X = np.ones((2, 6, 4), np.float32)
C6 = np.ones(6, np.float32)
BAD = [
    ("GroupNorm", dict(X=X, scale=C6, bias=C6), dict(num_groups=4), "C=6 is not divisible by num_groups=4"),
    ("GroupNorm", dict(X=X, scale=C6, bias=C6), {}, "num_groups must be set"),
    ("GroupNorm", dict(X=X, scale=np.ones(5, np.float32), bias=C6), dict(num_groups=3), "scale has shape \\[5\\]"),
    ("GroupNorm", dict(X=X, scale=C6, bias=C6), dict(num_groups=3, activation="relu"), "activation must be"),
    ("LayerNorm", dict(X=X, scale=np.ones(5, np.float32), bias=None), dict(axis=-1), "scale has shape"),
    ("LayerNorm", dict(X=X, scale=C6, bias=C6), dict(axis=3), "axis=3 is out of range"),
    ("LayerNorm", dict(X=X, scale=C6, bias=C6), dict(axis=2, channel_first=1), "channel_first=1"),
    ("RMSNorm", dict(X=X, scale=np.ones(3, np.float32)), {}, "scale has shape"),
    ("FilterResponseNorm", dict(X=X, gamma=C6, beta=C6, tau=None), {}, "use_tlu=1 needs the tau input"),
    ("FilterResponseNorm", dict(X=X, gamma=C6, beta=np.ones(2, np.float32), tau=C6), {}, "beta has shape"),
    ("WeightNorm", dict(V=X, g=np.ones(2, np.float32)), dict(dim=-1), "dim must be >= 0"),
    ("WeightNorm", dict(V=X, g=np.ones(3, np.float32)), dict(dim=0), "g has shape \\[3\\]"),
    ("FilterResponseNorm", dict(X=X, gamma=C6, beta=None, tau=C6), {}, "input 2 is empty"),
    ("GroupNorm", dict(X=X, scale=C6, bias=C6), dict(num_groups=-3), "num_groups must be set to a positive"),
    ("GroupNorm", dict(X=X, scale=C6, bias=C6), dict(num_groups=3, epsilon=-1e-5), "GroupNorm: epsilon must be >= 0"),
    ("GroupNorm", dict(X=X, scale=C6, bias=np.ones(4, np.float32)), dict(num_groups=3), "bias has shape \\[4\\]"),
    ("GroupNorm", dict(X=np.ones(6, np.float32), scale=C6, bias=C6), dict(num_groups=3), "rank >= 2"),
    ("LayerNorm", dict(X=X, scale=np.ones(4, np.float32), bias=None), dict(epsilon=-1.0), "LayerNorm: epsilon must be >= 0"),
    ("LayerNorm", dict(X=X, scale=np.ones(4, np.float32), bias=C6), {}, "bias has shape \\[6\\]"),
    ("LayerNorm", dict(X=X, scale=np.ones(4, np.float32), bias=None), dict(channel_first=1), "scale has shape \\[4\\]"),
    ("RMSNorm", dict(X=X, scale=np.ones(4, np.float32)), dict(epsilon=-1e-6), "RMSNorm: epsilon must be >= 0"),
    ("RMSNorm", dict(X=X, scale=np.ones(4, np.float32)), dict(axis=-4), "axis=-4 is out of range"),
    ("FilterResponseNorm", dict(X=X, gamma=np.ones(3, np.float32), beta=C6, tau=C6), {}, "gamma has shape \\[3\\]"),
    ("FilterResponseNorm", dict(X=X, gamma=C6, beta=C6, tau=np.ones(7, np.float32)), {}, "tau has shape \\[7\\]"),
    ("WeightNorm", dict(V=X, g=C6), dict(dim=3), "dim=3 is out of range"),
    # an attribute of the wrong type is an error, not silently the default
    ("GroupNorm", dict(X=X, scale=C6, bias=C6), dict(num_groups=3, epsilon=1), "GroupNorm: epsilon must be a float"),
    ("GroupNorm", dict(X=X, scale=C6, bias=C6), dict(num_groups=3.0), "GroupNorm: num_groups must be an int"),
    ("GroupNorm", dict(X=X, scale=C6, bias=C6), dict(num_groups=3, activation=1), "GroupNorm: activation must be a string"),
    ("LayerNorm", dict(X=X, scale=np.ones(4, np.float32), bias=None), dict(axis=-1.0), "LayerNorm: axis must be an int"),
    ("RMSNorm", dict(X=X, scale=np.ones(4, np.float32)), dict(epsilon="1e-6"), "RMSNorm: epsilon must be a float"),
    ("FilterResponseNorm", dict(X=X, gamma=C6, beta=C6, tau=C6), dict(use_tlu=1.0), "FilterResponseNorm: use_tlu must be an int"),
]


@pytest.mark.parametrize("op,inputs,attrs,message", BAD, ids=[f"{b[0]}-{b[3][:24]}" for b in BAD])
def test_bad_attributes_fail_at_session_creation(op, inputs, attrs, message):
    with pytest.raises(Exception, match=message):
        make_session(one_node(op, inputs, attrs))


@pytest.mark.parametrize("op,inputs,attrs,message", [b for b in BAD if "shape" in b[3] or "divisible" in b[3]])
def test_bad_shapes_known_only_at_run_time_fail_in_run(op, inputs, attrs, message):
    session = make_session(one_node(op, inputs, attrs, static=False))
    with pytest.raises(Exception, match=message):
        session.run(None, {k: v for k, v in inputs.items() if v is not None})


@pytest.mark.parametrize("optimize", [False, True])
def test_input_of_unknown_rank_leaves_the_output_undeclared(optimize, tmp_path):
    """A Reshape to a run-time shape gives X an unknown rank, which reaches the op's shape inference as
    rank 0; declared as is, the output would be a scalar and the next MatMul refused (zoo: SwinUNETR)."""
    d = 8
    nodes = [helper.make_node("Reshape", ["data", "shape"], ["x"]),
             helper.make_node("LayerNorm", ["x", "g", "b"], ["y"], domain=DOMAIN, axis=-1, epsilon=1e-5),
             helper.make_node("MatMul", ["y", "w"], ["z"])]
    rng = np.random.default_rng(0)
    w = rng.standard_normal((d, d)).astype(np.float32)
    inits = [numpy_helper.from_array(np.ones(d, np.float32), "g"), numpy_helper.from_array(np.zeros(d, np.float32), "b"),
             numpy_helper.from_array(w, "w")]
    graph = helper.make_graph(nodes, "unknown_rank", [helper.make_tensor_value_info("data", TensorProto.FLOAT, [2, 4, d]),
                                                      helper.make_tensor_value_info("shape", TensorProto.INT64, [None])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)],
                              ir_version=9)
    x = rng.standard_normal((2, 4, d)).astype(np.float32)
    z = make_session(model, optimize=optimize).run(None, {"data": x, "shape": np.array([8, d], np.int64)})[0]
    y = F.layer_norm(torch.from_numpy(x).reshape(8, d), (d,), eps=1e-5).numpy()
    np.testing.assert_allclose(z, y @ w, rtol=1e-5, atol=1e-5)

"""The numeric core of the BN fold (`normfold.passes.bn_math`), on its own: each
formula against PyTorch computing the unfolded layers in float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.utils.fusion import fuse_conv_bn_weights

from normfold.passes import bn_math



def bn_params(rng, c):
    return (rng.uniform(0.5, 2, c), rng.standard_normal(c), rng.standard_normal(c), rng.uniform(0.1, 2, c))


def torch_bn(x, scale, bias, mean, var, eps):
    t = lambda a: torch.from_numpy(np.asarray(a, np.float64))  # noqa: E731
    return F.batch_norm(x, t(mean), t(var), t(scale), t(bias), training=False, eps=eps)


@settings(max_examples=40, deadline=None)
@given(c=st.integers(1, 9), eps=st.sampled_from([1e-5, 1e-3, 0.1]), seed=st.integers(0, 2**16))
def test_bn_affine_is_inference_batch_norm(c, eps, seed):
    rng = np.random.default_rng(seed)
    params = bn_params(rng, c)
    x = torch.from_numpy(rng.standard_normal((2, c, 3)))
    s, t = bn_math.bn_affine(*params, eps)
    assert s.dtype == t.dtype == np.float64
    np.testing.assert_allclose(s[None, :, None] * x.numpy() + t[None, :, None], torch_bn(x, *params, eps).numpy(),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("var, eps, why", [(-1.0, 1e-5, "zero or negative"), (-1e-5, 1e-5, "zero or negative"),
                                          (float("nan"), 1e-5, "NaN or Inf"), (float("inf"), 1e-5, "NaN or Inf")])
def test_bn_affine_refuses_what_is_not_a_finite_map(var, eps, why):
    with pytest.raises(bn_math.NotFoldable, match=why):
        bn_math.bn_affine([1.0, 1.0], [0.0, 0.0], [0.0, 0.0], [1.0, var], eps)


@settings(max_examples=40, deadline=None)
@given(cin=st.integers(1, 4), cout=st.integers(1, 6), k=st.integers(1, 3), bias=st.booleans(),
       seed=st.integers(0, 2**16))
def test_conv_then_bn_matches_torch_fusion(cin, cout, k, bias, seed):
    rng = np.random.default_rng(seed)
    w, b = rng.standard_normal((cout, cin, k, k)), rng.standard_normal(cout) if bias else None
    scale, beta, mean, var = bn_params(rng, cout)
    s, t = bn_math.bn_affine(scale, beta, mean, var, 1e-5)
    folded_w, folded_b = bn_math.scale_output_channels(w, s, 0), bn_math.output_bias(b, s, t)
    as_t = lambda a: torch.from_numpy(np.asarray(a, np.float64))  # noqa: E731
    want_w, want_b = fuse_conv_bn_weights(as_t(w), None if b is None else as_t(b), as_t(mean), as_t(var), 1e-5,
                                          as_t(scale), as_t(beta))
    np.testing.assert_allclose(folded_w, want_w.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(folded_b, want_b.detach().numpy(), rtol=1e-12, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(groups=st.sampled_from([1, 2, 3]), per_in=st.integers(1, 3), per_out=st.integers(1, 3),
       seed=st.integers(0, 2**16))
def test_conv_transpose_then_bn(groups, per_in, per_out, seed):
    rng = np.random.default_rng(seed)
    cin, cout = groups * per_in, groups * per_out
    w, b = rng.standard_normal((cin, per_out, 2, 2)), rng.standard_normal(cout)
    params = bn_params(rng, cout)
    x = torch.from_numpy(rng.standard_normal((1, cin, 3, 3)))
    s, t = bn_math.bn_affine(*params, 1e-5)
    want = torch_bn(F.conv_transpose2d(x, torch.from_numpy(w), torch.from_numpy(b), stride=2, groups=groups),
                    *params, 1e-5)
    got = F.conv_transpose2d(x, torch.from_numpy(bn_math.scale_conv_transpose_output(w, s, groups)),
                             torch.from_numpy(bn_math.output_bias(b, s, t)), stride=2, groups=groups)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-10, atol=1e-10)


@settings(max_examples=40, deadline=None)
@given(groups=st.sampled_from([1, 2, 4]), per_in=st.integers(1, 3), per_out=st.integers(1, 2),
       k=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_bn_then_unpadded_conv(groups, per_in, per_out, k, seed):
    rng = np.random.default_rng(seed)
    cin, cout = groups * per_in, groups * per_out
    w, b = rng.standard_normal((cout, per_in, k, k)), rng.standard_normal(cout)
    params = bn_params(rng, cin)
    x = torch.from_numpy(rng.standard_normal((1, cin, 4, 5)))
    s, t = bn_math.bn_affine(*params, 1e-5)
    want = F.conv2d(torch_bn(x, *params, 1e-5), torch.from_numpy(w), torch.from_numpy(b), groups=groups)
    folded_b = bn_math.output_bias(b, 1.0, bn_math.conv_input_shift(w, t, groups))
    got = F.conv2d(x, torch.from_numpy(bn_math.scale_conv_input(w, s, groups)), torch.from_numpy(folded_b),
                   groups=groups)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-10, atol=1e-10)


@settings(max_examples=40, deadline=None)
@given(k=st.integers(1, 6), n=st.integers(1, 5), k_axis=st.sampled_from([0, 1]), seed=st.integers(0, 2**16))
def test_bn_then_matrix_product(k, n, k_axis, seed):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n) if k_axis == 0 else (n, k))  # K on k_axis (Gemm transB stores W as [N, K])
    params = bn_params(rng, k)
    x = rng.standard_normal((3, k))
    s, t = bn_math.bn_affine(*params, 1e-5)
    matrix = w if k_axis == 0 else w.T
    want = (s * x + t) @ matrix
    folded = bn_math.scale_matrix_input(w, s, k_axis)
    got = x @ (folded if k_axis == 0 else folded.T)
    np.testing.assert_allclose(got + bn_math.matrix_input_shift(w, t, k_axis), want, rtol=1e-12, atol=1e-12)

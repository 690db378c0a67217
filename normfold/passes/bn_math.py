"""The arithmetic of folding inference BatchNorm (NORMS.md), free of graph code.

Inference BN is the per-channel affine map `y = s ⊙ x + t` with
`s = γ / sqrt(var + ε)`, `t = β - s·mean`. Every function takes and returns
float64 arrays; callers cast the results back to the model's dtype.
"""

from __future__ import annotations

import numpy as np


class NotFoldable(ValueError):
    """The BN parameters do not define a finite affine map."""


def bn_affine(scale, bias, mean, var, epsilon: float) -> tuple[np.ndarray, np.ndarray]:
    """(s, t) of inference BatchNorm, in float64; raises NotFoldable when
    `var + ε` is not positive or any parameter is NaN/Inf."""
    scale, bias, mean, var = (np.asarray(a, dtype=np.float64).reshape(-1) for a in (scale, bias, mean, var))
    for name, values in (("scale", scale), ("bias", bias), ("mean", mean), ("var", var)):
        if not np.all(np.isfinite(values)):
            raise NotFoldable(f"BN {name} holds NaN or Inf")
    denominator = var + epsilon
    if np.any(denominator <= 0):
        raise NotFoldable("BN var + epsilon is zero or negative for some channel")
    s = scale / np.sqrt(denominator)
    return s, bias - s * mean


def _along(values: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    """`values` shaped to broadcast along `axis` of an ndim-dimensional array."""
    shape = [1] * ndim
    shape[axis] = -1
    return values.reshape(shape)


def _grouped(s: np.ndarray, groups: int, rows: int) -> np.ndarray:
    """Per-(row, column) factors for a grouped weight: row r belongs to group
    r // (rows/groups); column j of that group is channel g*(len(s)/groups) + j."""
    per_group = s.reshape(groups, -1)
    return per_group[np.arange(rows) // (rows // groups)]


def output_bias(b, s, t):
    """Bias of a linear layer followed by BN: `b' = s b + t` (b may be None).
    For Gemm pass `t / β` as t, since Gemm scales C by β."""
    b = 0.0 if b is None else np.asarray(b, dtype=np.float64)
    return s * b + t


def scale_output_channels(w, s, axis: int):
    """Weight of a layer followed by BN whose output channels lie on `axis` of
    the weight: Conv `W[O, ...]` (axis 0), MatMul `W[K, N]` (axis 1), Gemm B
    (axis 1, or 0 with transB): `W'[..., o, ...] = s_o W[..., o, ...]`."""
    w = np.asarray(w, dtype=np.float64)
    return w * _along(s, axis, w.ndim)


def scale_conv_transpose_output(w, s, groups: int):
    """ConvTranspose weight `W[I, O/g, k...]` followed by BN: output channel
    `g*(O/g) + j` of input row i (in group g) scales `W[i, j]`."""
    w = np.asarray(w, dtype=np.float64)
    factors = _grouped(s, groups, w.shape[0])  # [I, O/g]
    return w * factors.reshape(factors.shape + (1,) * (w.ndim - 2))


def _conv_input_factors(values, w_shape, groups: int):
    """Per-(o, i) factors for Conv weight `W[O, I/g, k...]`: input channel
    `c = g*(I/g) + i` of output o's group g."""
    out_channels = w_shape[0]
    return _grouped(values, groups, out_channels).reshape((out_channels, -1) + (1,) * (len(w_shape) - 2))


def scale_conv_input(w, s, groups: int):
    """BN followed by Conv `W[O, I/g, k...]`: `W'[o, i] = W[o, i] s_c`.
    Exact only when the conv does not pad its input, or t = 0."""
    w = np.asarray(w, dtype=np.float64)
    return w * _conv_input_factors(s, w.shape, groups)


def conv_input_shift(w, t, groups: int):
    """What BN's shift adds to each output of the following Conv: `Σ_{i,k} W[o, i, k] t_c`."""
    w = np.asarray(w, dtype=np.float64)
    return (w * _conv_input_factors(t, w.shape, groups)).reshape(w.shape[0], -1).sum(axis=1)


def scale_matrix_input(w, s, k_axis: int):
    """BN on X's last axis K followed by `X·W` (K on `k_axis` of W): scale W along K."""
    w = np.asarray(w, dtype=np.float64)
    return w * _along(s, k_axis, w.ndim)


def matrix_input_shift(w, t, k_axis: int):
    """What BN's shift adds to each output of the following `X·W`: `t·W`."""
    w = np.asarray(w, dtype=np.float64)
    return t @ (w if k_axis == 0 else w.T)

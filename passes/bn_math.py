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


def into_conv_output(w, b, s, t):
    """Conv (any rank, groups, strides, pads) followed by BN:
    `W'[o] = s_o W[o]`, `b' = s b + t` (b may be None)."""
    w = np.asarray(w, dtype=np.float64)
    b = np.zeros_like(s) if b is None else np.asarray(b, dtype=np.float64)
    return w * _along(s, 0, w.ndim), s * b + t


def into_conv_transpose_output(w, b, s, t, groups: int):
    """ConvTranspose with weight `W[I, O/g, k...]` followed by BN: output channel
    `g*(O/g) + j` of input row i scales `W[i, j]`."""
    w = np.asarray(w, dtype=np.float64)
    b = np.zeros_like(s) if b is None else np.asarray(b, dtype=np.float64)
    factors = _grouped(s, groups, w.shape[0])  # [I, O/g]
    return w * factors.reshape(factors.shape + (1,) * (w.ndim - 2)), s * b + t


def into_conv_input(w, b, s, t, groups: int):
    """BN followed by Conv with weight `W[O, I/g, k...]` (exact only without
    padding, or with t = 0): `W'[o, i] = W[o, i] s_c`, `b'_o = b_o + Σ W[o, i, k] t_c`
    with input channel `c = g*(I/g) + i` of output o's group g."""
    w = np.asarray(w, dtype=np.float64)
    out_channels = w.shape[0]
    b = np.zeros(out_channels) if b is None else np.asarray(b, dtype=np.float64)
    spatial = (1,) * (w.ndim - 2)
    s_rows = _grouped(s, groups, out_channels).reshape((out_channels, -1) + spatial)
    t_rows = _grouped(t, groups, out_channels).reshape((out_channels, -1) + spatial)
    shift = (w * t_rows).reshape(out_channels, -1).sum(axis=1)
    return w * s_rows, b + shift


def into_matrix_output(w, bias, s, t, n_axis: int):
    """Linear map `Y = X·W + bias` (or Gemm's B, with N on `n_axis`) followed by BN
    on Y's last axis N: scale W along N, `bias' = s bias + t` (bias may be None)."""
    w = np.asarray(w, dtype=np.float64)
    bias = 0.0 if bias is None else np.asarray(bias, dtype=np.float64)
    return w * _along(s, n_axis, w.ndim), s * bias + t


def into_matrix_input(w, s, t, k_axis: int):
    """BN on X's last axis K followed by `Y = X·W` (W's K on `k_axis`):
    scale W along K; returns (W', t·W), the latter to be added to Y."""
    w = np.asarray(w, dtype=np.float64)
    w_kn = w if k_axis == 0 else w.T
    return w * _along(s, k_axis, w.ndim), t @ w_kn

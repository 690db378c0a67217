"""The arithmetic of folding a per-channel affine map `y = a ⊙ x + t` into a
linear layer (NORMS.md), free of graph code.

A chain of elementwise Mul/Div/Add/Sub by constants (and inference BN, see
`bn_math`) composes into one `(a, t)`; `a` and `t` are float64 vectors of one
value per channel, or of size 1 for a scalar. The layer functions below take
and return float64 arrays; callers cast the results back to the model's dtype.
"""

from __future__ import annotations

import numpy as np


class NotFoldable(ValueError):
    """The constants do not define a finite per-channel affine map."""


def channel_vector(values, rank: int | None) -> tuple[int | None, np.ndarray]:
    """(axis, vector) of a constant operand broadcast against a tensor of `rank`
    (None: unknown): axis None for a scalar, else the negative axis (counted from
    the end, as broadcasting aligns) of its one non-1 dimension. Raises
    NotFoldable when the constant is not scalar or per-channel, would broadcast
    the tensor to a higher rank, or holds NaN/Inf."""
    values = np.asarray(values)
    if values.dtype.kind in "biuc":  # floats, and bfloat16 (an ml_dtypes type) fold
        raise NotFoldable(f"constant of type {values.dtype} is not floating point")
    limit = rank if rank is not None else 1
    if values.ndim > limit:
        raise NotFoldable(f"constant of shape {list(values.shape)} would broadcast a "
                          f"{'tensor of unknown rank' if rank is None else f'{rank}-D tensor'} to a higher rank")
    vector = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(vector)):
        raise NotFoldable("constant holds NaN or Inf")
    wide = [i for i, d in enumerate(values.shape) if d != 1]
    if not wide:
        return None, vector[:1] if vector.size else np.ones(1)
    if len(wide) > 1:
        raise NotFoldable(f"constant of shape {list(values.shape)} is not one value per channel of one axis")
    return wide[0] - values.ndim, vector


def then(a: np.ndarray, t: np.ndarray, op: str, c: np.ndarray, data_first: bool = True):
    """(a', t') of `op(a ⊙ x + t, c)` (or `op(c, a ⊙ x + t)` when not data_first)
    for op Mul, Div, Add or Sub; raises NotFoldable for `c / x` and division by 0."""
    if op == "Div" and not data_first:
        raise NotFoldable("constant / x is not affine in x")
    if op == "Div" and np.any(c == 0):
        raise NotFoldable("division by a constant that is zero for some channel")
    try:
        if op == "Mul":
            return a * c, t * c
        if op == "Add":
            return a + 0 * c, t + c
        if op == "Sub":
            return (a + 0 * c, t - c) if data_first else (-a + 0 * c, c - t)
        if op == "Div":
            return a / c, t / c
    except ValueError as why:  # numpy: sizes that do not broadcast
        raise NotFoldable(f"per-channel constants of different sizes ({why})") from None
    raise NotFoldable(f"{op} is not an affine step")


def shift_before_scale(a: np.ndarray, t: np.ndarray) -> np.ndarray:
    """`u` with `a ⊙ x + t = a ⊙ (x + u)`, i.e. `u = t / a`; raises NotFoldable
    when some channel has `a = 0` but `t != 0` (its output is constant)."""
    a, t = np.broadcast_arrays(a, t)
    if np.any((a == 0) & (t != 0)):
        raise NotFoldable("the scale is zero and the shift non-zero on some channel")
    return np.divide(t, a, out=np.zeros_like(t, dtype=np.float64), where=a != 0)


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
    """Bias of a linear layer followed by the affine map: `b' = s b + t` (b may be None).
    For Gemm pass `t / β` as t, since Gemm scales C by β."""
    b = 0.0 if b is None else np.asarray(b, dtype=np.float64)
    return s * b + t


def scale_output_channels(w, s, axis: int):
    """Weight of a layer followed by the affine map whose output channels lie on
    `axis` of the weight: Conv `W[O, ...]` (axis 0), MatMul `W[K, N]` (axis 1),
    Gemm B (axis 1, or 0 with transB): `W'[..., o, ...] = s_o W[..., o, ...]`."""
    w = np.asarray(w, dtype=np.float64)
    return w * _along(s, axis, w.ndim)


def scale_conv_transpose_output(w, s, groups: int):
    """ConvTranspose weight `W[I, O/g, k...]` followed by the affine map: output
    channel `g*(O/g) + j` of input row i (in group g) scales `W[i, j]`."""
    w = np.asarray(w, dtype=np.float64)
    factors = _grouped(s, groups, w.shape[0])  # [I, O/g]
    return w * factors.reshape(factors.shape + (1,) * (w.ndim - 2))


def scale_conv_transpose_input(w, s):
    """The affine map followed by ConvTranspose `W[I, O/g, k...]`: input channel i
    scales row `W[i]` (exact for the scale only: a ConvTranspose spreads a shift
    unevenly)."""
    w = np.asarray(w, dtype=np.float64)
    return w * _along(s, 0, w.ndim)


def _conv_input_factors(values, w_shape, groups: int):
    """Per-(o, i) factors for Conv weight `W[O, I/g, k...]`: input channel
    `c = g*(I/g) + i` of output o's group g."""
    out_channels = w_shape[0]
    return _grouped(values, groups, out_channels).reshape((out_channels, -1) + (1,) * (len(w_shape) - 2))


def scale_conv_input(w, s, groups: int):
    """The affine map followed by Conv `W[O, I/g, k...]`: `W'[o, i] = W[o, i] s_c`.
    Exact with t folded too only when the conv does not pad its input, or t = 0."""
    w = np.asarray(w, dtype=np.float64)
    return w * _conv_input_factors(s, w.shape, groups)


def conv_input_shift(w, t, groups: int):
    """What the shift adds to each output of the following Conv: `Σ_{i,k} W[o, i, k] t_c`."""
    w = np.asarray(w, dtype=np.float64)
    return (w * _conv_input_factors(t, w.shape, groups)).reshape(w.shape[0], -1).sum(axis=1)


def scale_matrix_input(w, s, k_axis: int):
    """The affine map on X's last axis K followed by `X·W` (K on `k_axis` of W): scale W along K."""
    w = np.asarray(w, dtype=np.float64)
    return w * _along(s, k_axis, w.ndim)


def matrix_input_shift(w, t, k_axis: int):
    """What the shift adds to each output of the following `X·W`: `t·W`."""
    w = np.asarray(w, dtype=np.float64)
    return t @ (w if k_axis == 0 else w.T)

"""Inference BatchNorm as an affine map (NORMS.md), free of graph code.

Inference BN is the per-channel affine map `y = s ⊙ x + t` with
`s = γ / sqrt(var + ε)`, `t = β - s·mean`, computed in float64; folding it is
`affine_math`'s.
"""

from __future__ import annotations

import numpy as np

from normfold.passes.affine_math import NotFoldable


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

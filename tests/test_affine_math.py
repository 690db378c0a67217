"""The chain algebra of `normfold.passes.affine_math` on its own: composing
Mul/Div/Add/Sub steps with `then` gives the map numpy computes step by step,
`channel_vector` reads exactly the per-channel and scalar constants, and
`shift_before_scale` rewrites `a ⊙ x + t` as `a ⊙ (x + u)`."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from normfold.passes.affine_math import NotFoldable, channel_vector, shift_before_scale, then

STEPS = [("Mul", True), ("Mul", False), ("Div", True), ("Add", True), ("Add", False), ("Sub", True), ("Sub", False)]


def numpy_step(v, op, c, data_first):
    a, b = (v, c) if data_first else (c, v)
    return {"Mul": np.multiply, "Div": np.divide, "Add": np.add, "Sub": np.subtract}[op](a, b)


@given(seed=st.integers(0, 2**32 - 1), c=st.integers(1, 5), steps=st.lists(st.sampled_from(STEPS), min_size=1,
       max_size=5), scalar=st.lists(st.booleans(), min_size=5, max_size=5))
def test_composed_chain_is_the_chain(seed, c, steps, scalar):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((3, c))
    v, (a, t) = x, (np.ones(1), np.zeros(1))
    for (op, data_first), is_scalar in zip(steps, scalar):
        k = rng.uniform(0.5, 2.0, 1 if is_scalar else c) * rng.choice([-1.0, 1.0])
        v = numpy_step(v, op, k, data_first)
        a, t = then(a, t, op, k, data_first)
    np.testing.assert_allclose(a * x + t, v, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape, rank, axis", [
    ([], 4, None), ([1], 4, None), ([1, 1, 1, 1], 4, None),
    ([3], 2, -1), ([3, 1, 1], 4, -3), ([1, 3, 1, 1], 4, -3), ([3], None, -1), ([1, 1, 3], 3, -1),
])
def test_channel_vector_reads_scalars_and_one_axis(shape, rank, axis):
    values = np.arange(1.0, 1.0 + int(np.prod(shape))).reshape(shape)
    got_axis, vector = channel_vector(values, rank)
    assert got_axis == axis
    np.testing.assert_array_equal(vector, values.reshape(-1))


@pytest.mark.parametrize("values, rank, why", [
    (np.ones((1, 3, 2, 1)), 4, "one value per channel"),
    (np.ones((1, 1, 3, 1, 1)), 4, "higher rank"),
    (np.ones((3, 1)), None, "unknown rank"),
    (np.array([1.0, np.nan]), 2, "NaN"),
    (np.array([1, 2], dtype=np.int64), 2, "floating point"),
])
def test_channel_vector_refuses(values, rank, why):
    with pytest.raises(NotFoldable, match=why):
        channel_vector(values, rank)


@pytest.mark.parametrize("op, data_first, c, why", [
    ("Div", True, np.array([1.0, 0.0]), "zero"),
    ("Div", False, np.array([1.0, 2.0]), "not affine"),
    ("Mul", True, np.ones(3), "different sizes"),
    ("Pow", True, np.ones(2), "not an affine step"),
])
def test_then_refuses(op, data_first, c, why):
    with pytest.raises(NotFoldable, match=why):
        then(np.ones(2), np.zeros(2), op, c, data_first)


def test_shift_before_scale():
    a, t = np.array([2.0, -0.5, 0.0]), np.array([1.0, 3.0, 0.0])
    u = shift_before_scale(a, t)
    x = np.random.default_rng(0).standard_normal((4, 3))
    np.testing.assert_allclose(a * (x + u), a * x + t, rtol=1e-15)
    with pytest.raises(NotFoldable, match="zero"):
        shift_before_scale(np.array([0.0, 1.0]), np.array([1.0, 0.0]))

"""Shared pytest set-up: the hypothesis profiles and the `rng` fixture (test helpers live in
`tests.helpers`; pytest puts the repository root on sys.path, see pyproject.toml)."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings


settings.register_profile(
    "normfold",
    max_examples=100,
    deadline=None,
    derandomize=False,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("normfold-quick", parent=settings.get_profile("normfold"), max_examples=8)
settings.register_profile("normfold-stress", parent=settings.get_profile("normfold"), max_examples=1000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "normfold"))


@pytest.fixture
def rng():
    import numpy as np

    return np.random.default_rng(12345)

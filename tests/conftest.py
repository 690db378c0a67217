"""Shared pytest set-up: hypothesis profile and the tests folder on sys.path
(so test modules can `import graphs`)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

sys.path.insert(0, str(Path(__file__).resolve().parent))

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

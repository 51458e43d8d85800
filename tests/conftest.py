"""Shared test settings: a fixed seed per test and a bounded hypothesis profile (2-core CI)."""
import os

import pytest
import torch

try:
    from hypothesis import settings

    settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:  # pragma: no cover
    pass


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield

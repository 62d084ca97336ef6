"""Fixtures of the integration tests that several modules share."""

from __future__ import annotations

import pytest
from ray_cluster import embedded_ray


@pytest.fixture(scope="module")
def ray_local():
    """An embedded Ray for one test module, stopped with every process it started
    (``ray_cluster.embedded_ray``)."""
    with embedded_ray():
        yield

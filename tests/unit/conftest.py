"""Fixtures of the unit tests that several modules share."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():
    """One torch thread for the test (a module asks for it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``): the tiny nets' ops are too small to
    share out, and a second thread that waits for a busy core made each step ~50x slower on the
    2-core test machine (the shipped configs train with ``threads_per_worker: 1`` too)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

"""Fixtures of the quality tests: the quality runs, one-thread processes two at a time (``pool.py``)
for the tests the session selected, with the reference evaluators they load trained first as jobs of
the same pool. The pool starts with the session and runs beside the other tests at the idle CPU
priority (``quality_pool`` in tests/conftest.py); the quality tests run last and read its results.
What a digits run does is ``quality_run.py``; an emoji run, ``emoji_run.py``."""

from __future__ import annotations

import pytest
from pool import BackgroundPool


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "quality_runs(*keys): the quality runs (conftest.py) a test reads")


@pytest.fixture(scope="session")
def quality_runs(quality_pool: BackgroundPool | None) -> dict[str, dict]:
    """The results of the quality runs that this session's selected tests ask for, by key: waits for
    the pool the session started (``quality_pool``, tests/conftest.py)."""
    assert quality_pool is not None, "no quality run was started for this session"
    return quality_pool.results()

"""Shared fixtures. Expensive ones are session-scoped and built once."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def digits_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits shards built with the default DataConfig (8x8, 100 per shard); read-only."""
    from aigc.config import DataConfig
    from aigc.data import build_dataset

    out = tmp_path_factory.mktemp("datasets") / "digits"
    build_dataset(DataConfig(), out)
    return out


@pytest.fixture(scope="session", autouse=True)
def shared_evaluator_cache(tmp_path_factory: pytest.TempPathFactory):
    """Every evaluator a test trains, directly or through `aigc train`'s final evaluation, lands in
    one session folder (the one tests/quality/conftest.py uses), so the suite trains it once and
    never writes the project's own .cache/."""
    import os

    cache = tmp_path_factory.getbasetemp() / "reference-evaluators"
    old = os.environ.get("AIGC_EVALUATOR_CACHE")
    os.environ["AIGC_EVALUATOR_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("AIGC_EVALUATOR_CACHE", None)
    else:
        os.environ["AIGC_EVALUATOR_CACHE"] = old

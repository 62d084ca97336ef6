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

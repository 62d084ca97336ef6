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


@pytest.fixture
def bar_batch():
    """Factory of a fixed, easy batch: ``n`` 8x8 grey images, a bright column per class on -1
    (class-dependent bars, so real images are easy to tell from fakes and from each other), little
    noise, digits captions, labels and an all-valid mask. Deterministic."""
    import torch

    from aigc.data.captions import digit_caption

    def make(n: int = 16) -> dict:
        g = torch.Generator().manual_seed(0)
        labels = [i % 10 for i in range(n)]
        images = -torch.ones(n, 1, 8, 8)
        for i, label in enumerate(labels):
            images[i, 0, :, label % 8] = 1.0
        images += 0.05 * torch.randn(images.shape, generator=g)
        return {
            "image": images,
            "caption": [digit_caption(lab, f"k{i}") for i, lab in enumerate(labels)],
            "label": torch.tensor(labels),
            "valid": torch.ones(n, dtype=torch.bool),
        }

    return make

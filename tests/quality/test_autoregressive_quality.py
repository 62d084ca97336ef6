"""Autoregressive quality: models/autoregressive.yaml trained on the digits shards meets
its targets, and its sampling is reproducible end to end.

The run is ``quality_run.py``, started by ``conftest.quality_runs``; the calibration in
models/autoregressive.md.
"""

from __future__ import annotations

import pytest
from quality_run import assert_quality


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.quality_runs("digits/autoregressive")
def test_autoregressive_learns_digits(quality_runs: dict[str, dict]) -> None:
    run = quality_runs["digits/autoregressive"]
    assert "error" not in run, run.get("error")
    # Uniform over 16 levels is ln 16 = 2.77 nats per token; the untrained net is about there.
    assert run["val_loss"] < run["val_loss_untrained"] - 1.0, run
    assert_quality(run, min_accuracy=0.80, fd_ratio=0.3)
    assert run["repeatable"], run  # the same seed generates the same images

"""VAE quality: models/vae.yaml trained on the digits shards meets its targets.

Samples use the config's sampling temperature. The run is ``quality_run.py``, started by
``conftest.quality_runs``; the calibration in models/vae.md.
"""

from __future__ import annotations

import pytest
from quality_run import assert_quality

MIN_ELBO_GAIN = 50.0  # nats per image: val/loss (negative ELBO) drop from the untrained model


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.quality_runs("digits/vae")
def test_vae_follows_heldout_captions(quality_runs: dict[str, dict]) -> None:
    run = quality_runs["digits/vae"]
    assert_quality(run, min_accuracy=0.75, fd_ratio=0.2)
    assert run["val_loss"] < run["val_loss_untrained"] - MIN_ELBO_GAIN, run

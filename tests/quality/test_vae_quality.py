"""VAE quality (issue 3): models/vae.yaml trained on the digits shards meets its targets.

Samples use the config's sampling temperature. The shared loop is in ``tests/quality/conftest.py``;
the calibration in models/vae.md.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from quality_run import quality_config, train_and_evaluate

MIN_ELBO_GAIN = 50.0  # nats per image: val/loss (negative ELBO) drop from the untrained model


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_vae_follows_heldout_captions(digits_dataset: Path, reference_evaluator) -> None:
    run = train_and_evaluate(quality_config("vae"), digits_dataset, reference_evaluator, validate=True)
    run.assert_quality(min_accuracy=0.75, fd_ratio=0.2)
    assert run.val_loss < run.val_loss_untrained - MIN_ELBO_GAIN, run.summary

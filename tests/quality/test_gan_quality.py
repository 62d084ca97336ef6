"""GAN quality (issue 3): models/gan.yaml trained on the digits shards meets its targets.

``trainer.max_steps`` counts optimiser steps (each batch makes ``d_steps`` discriminator updates and
one generator update); samples come from the EMA generator. The shared loop is in
``tests/quality/conftest.py``; the calibration in models/gan.md.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from quality_run import quality_config, train_and_evaluate


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_gan_follows_heldout_captions(digits_dataset: Path, reference_evaluator) -> None:
    cfg = quality_config("gan")
    run = train_and_evaluate(cfg, digits_dataset, reference_evaluator)
    assert int(run.module.ema_updates) == cfg.trainer.max_steps // (cfg.model.d_steps + 1)
    run.assert_quality(min_accuracy=0.80, fd_ratio=0.2)

"""GAN quality: models/gan.yaml trained on the digits shards meets its targets.

``trainer.max_steps`` counts optimiser steps (each batch makes ``d_steps`` discriminator updates and
one generator update); samples come from the EMA generator. The run is ``quality_run.py``, started
by ``conftest.quality_runs``; the calibration in models/gan.md.
"""

from __future__ import annotations

import pytest
from quality_run import assert_quality


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.quality_runs("digits/gan")
def test_gan_follows_heldout_captions(quality_runs: dict[str, dict]) -> None:
    run = quality_runs["digits/gan"]
    assert_quality(run, min_accuracy=0.80, fd_ratio=0.2)
    assert run["ema_updates"] == run["max_steps"] // (run["d_steps"] + 1), run

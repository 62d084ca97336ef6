"""Diffusion quality: models/diffusion.yaml trained on the digits shards meets its targets.

Samples use the config's defaults (DDIM, ``sample_steps``, ``guidance``). The run is ``quality_run.py``
(seed and thread conventions), started by ``conftest.quality_runs``; the calibration in
models/diffusion.md.
"""

from __future__ import annotations

import pytest
from quality_run import assert_quality


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.quality_runs("digits/diffusion")
def test_diffusion_follows_heldout_captions(quality_runs: dict[str, dict]) -> None:
    run = quality_runs["digits/diffusion"]
    assert_quality(run, min_accuracy=0.95, fd_ratio=0.2)
    # val/loss of the EMA model on fixed noise against an untrained model's.
    assert run["val_loss"] < 0.5 * run["val_loss_untrained"], run

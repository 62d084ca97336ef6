"""Diffusion quality (issue 3): models/diffusion.yaml trained on the digits shards meets its targets.

Samples use the config's defaults (DDIM, ``sample_steps``, ``guidance``). The shared loop and the
seed/thread conventions are in ``tests/quality/conftest.py``; the calibration in models/diffusion.md.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from quality_run import quality_config, train_and_evaluate


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_diffusion_follows_heldout_captions(digits_dataset: Path, reference_evaluator) -> None:
    run = train_and_evaluate(quality_config("diffusion"), digits_dataset, reference_evaluator, validate=True)
    run.assert_quality(min_accuracy=0.95, fd_ratio=0.2)
    # val/loss of the EMA model on fixed noise against an untrained model's.
    assert run.val_loss < 0.5 * run.val_loss_untrained, run.summary

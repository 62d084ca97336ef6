"""Diffusion quality: models/diffusion.yaml trained on the digits shards meets its targets.

Samples use the config's defaults (DDIM, ``sample_steps``, ``guidance``). The run is ``quality_run.py``
(seed and thread conventions), started by ``conftest.quality_runs``; the calibration in
models/diffusion.md. The same run measures image-to-image (``quality_run.seven_to_one``): the claim
"a pixel-space diffusion model trained on digits turns a 'seven' into a 'one' at strength 0.6 in most
cases, measured by the reference classifier".
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


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.quality_runs("digits/diffusion")
def test_diffusion_edits_seven_into_one(quality_runs: dict[str, dict]) -> None:
    run = quality_runs["digits/diffusion"]
    assert "error" not in run, run.get("error")
    # The 19 val sevens, 10 edits each from its own noise, prompt "a handwritten digit one",
    # strength 0.6, seed 0. Calibration (AIGC_QUALITY_SEED 0 / 1 / 2, 2026-12-06): 99.5 / 98.4 /
    # 99.5 % classified as 1 (0.5 / 1.1 / 0.5 % still 7); strength 0.4: 76 / 70 / 66 %, 0.3: 47 /
    # 38 / 21 %. "Most cases" is > 50 %; the bar is the worst seed's 98.4 % less a margin.
    assert run["edit/edits"] >= 100, run
    assert run["edit/seven_to_one"] > 0.9, run
    # The classifier calls no unedited seven a one (0 % on every seed): the edit made the ones.
    assert run["edit/input_as_one"] < 0.05, run
    assert run["edit/input_as_seven"] > 0.9, run

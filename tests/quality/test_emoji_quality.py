"""The families learn the RGB emoji at 32 px (issue 12), the latent ones through the whole Stable
Diffusion workflow (autoencoder -> ``aigc data encode`` -> latent model). ``make test`` runs the
latent diffusion; ``AIGC_QUALITY_ALL=1`` adds latent autoregression, the VAE and pixel diffusion
(see ``IN_MAKE_TEST``).

What each run trains and how it is measured is in ``emoji_run.py``: the shipped ``models/*-rgb32.yaml``
shrunk to a CPU test's budget, samples from train captions, the emoji reference evaluator. The runs
are one-thread processes that ``conftest.quality_runs`` runs two at a time with the digits ones.
The bars were calibrated over 3 seeds (``AIGC_QUALITY_SEED`` = 0, 1, 2; figures and commands on the
model cards): each is the worst seed's figure with a margin, and none is met by the untrained model.

A figure has a bar only where a CPU test's budget moves it clearly past the untrained model in all 3
seeds. The CLIP score (200 images) varies by about +-2 between untrained seeds, so only latent
diffusion's (4.3-4.8 against -0.7-2.1) has one. The GAN has no test here: at a budget that fits
(a quarter of the width, 400 batches), its FD stayed above the untrained generator's in all 3 seeds
(29.7-40.3 against 23.6-30.8; the adversarial game's early phase) and its CLIP score did not
separate (2.4-6.5 against -1.3-3.4); the digits test (test_gan_quality.py) is its quality test.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import pytest
from emoji_run import RECIPES


@dataclass(frozen=True)
class Bars:
    """A run passes when its samples' FD is at most ``max_fd`` and their CLIP score (train captions) at
    least ``min_clip``; an autoencoder stage also needs PSNR >= ``min_psnr`` and reconstruction FD <=
    ``max_recon_fd``. None: no bar on that figure (the model card says why); it is still printed."""

    max_fd: float | None
    min_clip: float | None
    min_psnr: float | None = None
    max_recon_fd: float | None = None


# Calibration over seeds 0, 1, 2 (module docstring). References: the train-vs-val FD floor is 7.25 at
# 200 images (10.1 at the pixel diffusion run's 100); the real train images score 86 against their
# own captions (the evaluator's dual encoder learnt those pairs; val images score 11.7 against theirs).
BARS: dict[str, Bars] = {
    # FD seeds 16.40, 18.08, 19.28 (untrained 30.50, 22.91, 25.93); CLIP 1.2-3.5, untrained -0.5-0.6.
    "vae": Bars(max_fd=20.5, min_clip=None),
    # FD seeds 18.43, 18.72, 17.67 (floor 10.07 at 100 images; untrained 27.4); CLIP -0.2-1.4.
    "diffusion": Bars(max_fd=20.0, min_clip=None),
    # PSNR 18.54, 17.72, 18.42; rFD 8.44, 9.00, 7.97; FD 13.68, 14.61, 13.54 (untrained 21.4-23.7);
    # CLIP 4.71, 4.80, 4.28 (untrained 2.09, -0.66, 1.42).
    "latent-diffusion": Bars(max_fd=16.0, min_clip=3.5, min_psnr=17.0, max_recon_fd=10.0),
    # PSNR 17.97, 17.47, 17.35; rFD 8.62, 10.30, 9.81; FD 12.28, 14.61, 14.03 (untrained 17.27, 17.06,
    # 16.85); CLIP 1.95, 1.14, 5.34 against untrained 0.53, 1.99, 1.02: no bar.
    "latent-autoregressive": Bars(max_fd=15.5, min_clip=None, min_psnr=16.5, max_recon_fd=11.5),
}


# `make test` runs latent diffusion, the Stable Diffusion workflow (about 2 CPU-minutes with its
# autoencoder, after the ~2.5 CPU-minute emoji evaluator). The others would take the clean-clone suite
# past CI's 40-minute budget on 2 cores: latent autoregression (~4.3 CPU-minutes with its VQ
# autoencoder; CI took 40.7 min with it in), the VAE and pixel diffusion (another ~7 CPU-minutes). They
# run with AIGC_QUALITY_ALL=1 until faster start-up (issue 13) makes room; their bars are calibrated
# like the others'. tests/integration/test_latents.py still trains, registers and samples latent
# autoregression in `make test`.
IN_MAKE_TEST = ("latent-diffusion",)
ALL = os.environ.get("AIGC_QUALITY_ALL") == "1"


def _case(name: str):
    if ALL or name in IN_MAKE_TEST:
        return pytest.param(name, marks=pytest.mark.quality_runs(f"emoji/{name}"))
    reason = f"emoji {name} quality run: AIGC_QUALITY_ALL=1 runs it (CI budget, see IN_MAKE_TEST)"
    return pytest.param(name, marks=pytest.mark.skip(reason=reason))


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("name", [_case(name) for name in sorted(RECIPES)])
def test_family_learns_rgb_emoji(name: str, quality_runs: dict[str, dict]) -> None:
    result, bars = quality_runs[f"emoji/{name}"], BARS[name]
    assert "error" not in result, result.get("error")
    shown = json.dumps(result)  # every figure, on failure
    trained, untrained = result["trained"], result.get("untrained")
    assert not trained["collapse"], shown
    if bars.max_fd is not None:
        assert trained["fd"] <= bars.max_fd, shown
        assert untrained is None or untrained["fd"] > bars.max_fd, shown  # a bar the untrained net misses
    if bars.min_clip is not None:
        assert trained["clip_score"] >= bars.min_clip, shown
        assert untrained is None or untrained["clip_score"] < bars.min_clip, shown
    if bars.min_psnr is not None:
        assert result["autoencoder"]["psnr"] >= bars.min_psnr, shown
        assert result["autoencoder"]["recon_fd"] <= bars.max_recon_fd, shown

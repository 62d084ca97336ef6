"""Latent diffusion on RGB emoji at 32 px learns (issue 12): the Stable Diffusion workflow end to end.

Stage 1 trains ``models/autoencoder-kl32.yaml`` and checks its reconstructions; stage 2 encodes the
emoji with it (``aigc.data.latents.encode_dataset``, what ``aigc data encode`` runs); stage 3 trains
``models/latent-diffusion-rgb32.yaml`` on the latents and checks the decoded samples. The configs
are the shipped ones with fewer steps and, for the diffusion UNet, half the width
(``model.base_channels=32``), so that the whole test is a few CPU minutes; both train with the
Trainer of ``aigc train`` in this process on one thread.

The emoji have no labels, so the figures are the label-free ones of the dataset's reference
evaluator, on 200 images from the val captions, which no model saw, sampled with guidance 3. The
bars were calibrated over 3 seeds (``AIGC_QUALITY_SEED`` = 0, 1, 2; figures on the model cards
``models/autoencoder.md`` and ``models/diffusion.md``): each is the worst seed's figure with a margin.
FD is checked against the untrained model and the train-vs-val floor. The CLIP score is printed but
has no bar: at this budget it rose over the untrained model's by 4.1, 1.6 and 0.1 for seeds 0, 1, 2,
so a bar that all three pass would test nothing; the caption is learnt later (800 steps of the
shipped width: 6.3 at guidance 2), which is ``benchmarks/latent.py``'s budget, not a test's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from quality_run import quality_config

AE_STEPS = 300
LD_STEPS = 400
LD_WIDTH = 32  # model.base_channels: the shipped 64 learns too slowly for a CPU test's budget
SAMPLES = 200
GUIDANCE = 3.0

# Calibration over seeds 0, 1, 2 (module docstring): the worst seed's figure, with a margin.
MIN_PSNR = 17.0  # dB; seeds 18.54, 17.72, 18.42; the blurry baseline (4x average-pool + upsample) 15.9
MAX_RECON_FD = 10.0  # reconstructions vs originals; seeds 8.44, 9.00, 7.97; train-vs-val floor 7.25
MAX_FD_RATIO = 0.75  # latent diffusion's FD over the untrained model's; seeds 0.63, 0.61, 0.70
MAX_FD = 17.5  # seeds 13.56, 14.29, 16.66 (untrained 21.4-23.7, train-vs-val floor 7.25)


@pytest.fixture(scope="module")
def emoji32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The OpenMoji emoji at 32 px RGB, built into the session's temp folder (seconds)."""
    from aigc.config import DataConfig
    from aigc.data import build_dataset

    out = tmp_path_factory.mktemp("datasets") / "emoji32"
    build_dataset(DataConfig(name="emoji32", source="openmoji", image_size=32, channels=3), out)
    return out


@pytest.fixture(scope="module")
def emoji_evaluator(emoji32: Path):
    """The emoji32 reference evaluator (in the session's evaluator cache, tests/conftest.py), trained
    on both cores: nothing else runs while it trains."""
    from aigc.evaluation import reference_evaluator

    return reference_evaluator(emoji32, threads=2)


def _fit(cfg, location: Path):
    """The family module of ``cfg`` for the dataset at ``location``, trained for its max_steps."""
    import pytorch_lightning as pl

    from aigc.data.loader import ShardDataModule
    from aigc.models import build_module_for_dataset
    from aigc.training.trainer import build_trainer

    pl.seed_everything(cfg.trainer.seed, verbose=False)
    module = build_module_for_dataset(cfg, str(location))
    return module, lambda: build_trainer(module, limit_val_batches=0).fit(
        module, datamodule=ShardDataModule(cfg.data, location=location, seed=cfg.trainer.seed)
    )


# About 3.5 min on 2 cores (the emoji evaluator 1.5, the two trainings and evaluations 2), which the
# full suite (39 min on a clean 2-core clone, README "Tests") cannot take under its 40-min budget:
# run with `make test-rgb` (AIGC_RGB_QUALITY=1) until start-up work (issue 13) makes room.
@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("AIGC_RGB_QUALITY") != "1",
    reason="RGB latent quality test: run with `make test-rgb` (AIGC_RGB_QUALITY=1); ~3.5 min",
)
@pytest.mark.timeout(1200)
def test_latent_diffusion_learns_rgb_emoji(emoji32: Path, emoji_evaluator, tmp_path: Path) -> None:
    from aigc.data.latents import encode_dataset
    from aigc.data.manifest import read_manifest
    from aigc.evaluation import evaluate_model
    from aigc.models.export import export_model

    # 1. The autoencoder: reconstructions close to the originals, in pixels and in evaluator features.
    ae_cfg = quality_config("autoencoder-kl32", f"trainer.max_steps={AE_STEPS}", "data.num_workers=0")
    ae, fit = _fit(ae_cfg, emoji32)
    fit()
    recon = evaluate_model(ae.eval(), emoji_evaluator, emoji32, num_samples=SAMPLES, seed=0)
    summary = {"seed": ae_cfg.trainer.seed, "psnr": recon["eval/psnr"], "recon_fd": recon["eval/fd"]}

    # 2. Encode once: 4x8x8 latents, 48x fewer values than the 3x32x32 pixels.
    latents = tmp_path / "emoji32-kl"
    encode_dataset(emoji32, str(export_model(ae, tmp_path / "ae")), latents)
    assert read_manifest(latents)["latent"]["shape"] == [4, 8, 8]

    # 3. Latent diffusion, evaluated on the decoded pixels against the untrained model.
    ld_cfg = quality_config(
        "latent-diffusion-rgb32",
        f"trainer.max_steps={LD_STEPS}",
        f"model.base_channels={LD_WIDTH}",
        f"data.location={latents}",
    )
    ld, fit = _fit(ld_cfg, latents)
    untrained = evaluate_model(ld, emoji_evaluator, emoji32, num_samples=SAMPLES, seed=0, guidance=GUIDANCE)
    fit()
    result = evaluate_model(ld, emoji_evaluator, emoji32, num_samples=SAMPLES, seed=0, guidance=GUIDANCE)
    summary |= {
        "fd": result["eval/fd"],
        "fd_untrained": untrained["eval/fd"],
        "fd_train_val": result["eval/fd_train_val"],
        "clip_score": result["eval/clip_score"],
        "clip_untrained": untrained["eval/clip_score"],
        "clip_score_val": result["eval/clip_score_val"],
        "diversity": result["eval/diversity"],
    }
    print(json.dumps(summary))
    assert result["prompts"] == "val"
    assert summary["psnr"] >= MIN_PSNR, summary
    assert summary["recon_fd"] <= MAX_RECON_FD, summary
    assert result["eval/fd"] <= min(MAX_FD, MAX_FD_RATIO * untrained["eval/fd"]), summary
    assert not result["collapse"] and not result["copying"], summary

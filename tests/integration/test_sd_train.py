"""``aigc train`` of the sd family (a diffusers pipeline, LoRA) on the embedded Ray, registered, loaded back.

A tiny random-weight pipeline (tests/sd_pipeline.py) gets LoRA adapters trained for a few steps on one
Ray Train worker on the digits (8x8 grey, repeated to RGB), encoded once by the pipeline's VAE with
``aigc data encode`` (4x4x4 latents; the image path is tests/unit/test_sd.py's), without the final evaluation;
``train_and_register`` registers the run as ``aigc-sd/1``. The registered version, loaded through the
registry (no pickle), draws the same images for a seed as the run's checkpoint; the checkpoint holds
the adapter only; ``aigc export aigc-sd/1 --diffusers`` writes an adapter diffusers loads onto the base.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from sd_pipeline import build_tiny_pipeline, folder_bytes

pytestmark = pytest.mark.slow

STEPS = 6
PROMPTS = ["seven", "zero"]  # short: the tiny CLIP tokenizer keeps 16 tokens


def overrides(tmp: Path, dataset: Path, pipeline: Path) -> list[str]:
    return [
        "model.family=sd",
        f"model.pipeline={pipeline}",
        "model.lora.rank=4",
        "model.sample_steps=2",
        f"data.location={dataset}",
        "data.batch_size=16",
        "data.num_workers=0",
        f"trainer.max_steps={STEPS}",
        "trainer.lr=1e-3",
        "trainer.lr_schedule=constant",
        "trainer.log_every_steps=2",
        f"trainer.val_every_steps={STEPS}",
        "trainer.limit_val_batches=1",
        f"trainer.checkpoint_every_steps={STEPS}",
        f"trainer.sample_every_steps={STEPS}",
        "scaling.num_workers=1",
        f"scaling.storage_path={tmp / 'runs'}",
        f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}",
        "tracking.experiment=sd",
        "tracking.system_metrics=false",
    ]


@pytest.mark.timeout(300)
def test_a_lora_sd_run_registers_and_the_version_draws_what_its_checkpoint_draws(
    ray_local, digits_dataset, tmp_path
):
    from diffusers import StableDiffusionPipeline

    from aigc.cli import app
    from aigc.models.export import load_model
    from aigc.registry.versions import load_version, resolve_version
    from aigc.workflows.train import train_and_register

    pipeline = build_tiny_pipeline(tmp_path / "pipe", scheduler="DDIMScheduler")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    latents = tmp_path / "digits-sd"
    r = CliRunner().invoke(
        app, ["data", "encode", str(digits_dataset), "--autoencoder", str(pipeline), "--out", str(latents)]
    )
    assert r.exit_code == 0, r.output
    t0 = time.perf_counter()
    args = overrides(tmp_path, latents, pipeline)
    out = train_and_register(None, args, name="sd-lora", evaluate=False)
    print(f"train + register: {time.perf_counter() - t0:.1f} s")
    assert out.status == "FINISHED" and out.global_step == STEPS
    assert out.registered == "aigc-sd/1"

    # The checkpoint is the adapter (and its optimiser state), not the pipeline.
    ckpt = Path(out.checkpoint)
    saved = torch.load(ckpt, weights_only=True)["state_dict"]
    assert saved and all(".lora_" in k for k in saved), sorted(saved)[:5]
    ratio = ckpt.stat().st_size / folder_bytes(pipeline)
    assert ratio < 0.10, ratio

    from_ckpt = load_model(ckpt)
    client = MlflowClient(uri)
    version = resolve_version(client, "aigc-sd/1")
    registered = load_version(client, version)
    assert registered.family == "sd" and registered.model_cfg.lora.rank == 4
    assert registered.latent["kind"] == "sd"  # trained on the encoded latents, decodes with its VAE
    expected = from_ckpt.generate(PROMPTS, num_samples=2, seed=3, steps=3, guidance=3.0)
    assert expected.shape == (4, 1, 8, 8)
    assert torch.equal(registered.generate(PROMPTS, num_samples=2, seed=3, steps=3, guidance=3.0), expected)
    # Training moved the adapter off the identity: not the base pipeline's images.
    lora_b = [v for k, v in saved.items() if "lora_B" in k]
    assert any(v.abs().max() > 0 for v in lora_b)

    # `aigc export` of the registered version: an adapter that diffusers loads onto the base pipeline.
    r = CliRunner().invoke(
        app, ["export", "aigc-sd/1", str(tmp_path / "adapter"), "--diffusers", "--tracking-uri", uri]
    )
    assert r.exit_code == 0, r.output
    assert "diffusers LoRA adapter" in r.output
    pipe = StableDiffusionPipeline.from_pretrained(pipeline)
    pipe.load_lora_weights(tmp_path / "adapter")
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(
        PROMPTS,
        num_images_per_prompt=2,
        num_inference_steps=3,
        guidance_scale=3.0,
        height=8,
        width=8,
        generator=torch.Generator().manual_seed(3),
        output_type="pt",
    ).images  # RGB in [0, 1]
    # The module averages the VAE's RGB to grey for a 1-channel model, then clips; diffusers clips
    # each channel: the two agree wherever no channel was clipped.
    grey = (theirs.mean(1, keepdim=True) * 255).round().to(torch.uint8)
    unclipped = ((theirs > 0) & (theirs < 1)).all(1, keepdim=True)
    assert unclipped.float().mean() > 0.5
    assert (grey.int() - expected.int()).abs()[unclipped].max() <= 1

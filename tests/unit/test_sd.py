"""The ``sd`` family (aigc.models.sd): a diffusers Stable-Diffusion-format pipeline behind the generate()
contract, trained (full or LoRA), checkpointed without its frozen base and exported back to diffusers.

Every pipeline here is a tiny random-weight one the test writes (tests/sd_pipeline.py): offline, fast.
"""

from __future__ import annotations

import pytest
import torch

from aigc.config import ConfigError, load_config
from sd_pipeline import IMAGE_SIZE, build_tiny_pipeline, folder_bytes

PROMPTS = ["a red square", "a blue circle"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/unit/conftest.py


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    """Two tiny pipelines: epsilon with DDIM (deterministic sampling), v-prediction with DDPM
    (ancestral: the sampler draws noise from the generator at every step)."""
    root = tmp_path_factory.mktemp("sd")
    return {
        "eps": build_tiny_pipeline(root / "eps", prediction_type="epsilon", scheduler="DDIMScheduler"),
        "v": build_tiny_pipeline(root / "v", prediction_type="v_prediction", scheduler="DDPMScheduler"),
    }


def make_module(pipeline, **model):
    from aigc.models import module_class
    from aigc.models.text import Tokenizer

    return module_class("sd")(
        model={"pipeline": str(pipeline), **model},
        tokenizer=Tokenizer.build(PROMPTS).to_dict(),
        image_size=IMAGE_SIZE,
        channels=3,
        trainer={"lr": 1e-3, "max_steps": 1000, "lr_schedule": "constant", "seed": 0},
    )


def toy_batches(n: int = 4):
    """``n`` coloured squares on a dark ground, with captions: a dataset a model can fit in a few steps."""
    g = torch.Generator().manual_seed(0)
    images = torch.full((n, 3, IMAGE_SIZE, IMAGE_SIZE), -0.8)
    captions = []
    for i in range(n):
        colour = i % 3
        y, x = (torch.randint(0, IMAGE_SIZE - 8, (2,), generator=g)).tolist()
        images[i, colour, y : y + 8, x : x + 8] = 0.9
        captions.append(f"a {['red', 'green', 'blue'][colour]} square")
    return images, captions


def fixed_loss(module, images, captions) -> float:
    """The loss on fixed VAE samples, noise and timesteps: comparable before and after training."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        return float(
            module.loss(module.latents({"image": images}, g).repeat(4, 1, 1, 1), captions * 4, g).mean()
        )


def fit(module, steps: int, tmp_path, ckpt_path=None):
    """``steps`` optimiser steps of Lightning on the toy batch (the same 4 images each step)."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    images, captions = toy_batches()
    rows = [{"image": im, "caption": c} for im, c in zip(images, captions, strict=True)]
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, DataLoader(rows, batch_size=4), ckpt_path=ckpt_path)
    return trainer


# ----------------------------------------------------------------------------------------- config


def test_config_needs_a_pipeline_and_takes_the_shared_lora_section():
    cfg = load_config(None, ["model.family=sd", "model.pipeline=/data/sd15", "model.lora.rank=4"])
    assert cfg.model.lora.rank == 4 and cfg.model.lora.alpha is None
    assert cfg.model.snr_gamma is None and cfg.model.cond_drop_prob == 0.1
    with pytest.raises(ConfigError, match="model.pipeline"):
        load_config(None, ["model.family=sd"])
    with pytest.raises(ConfigError, match="model.text: unknown key"):
        load_config(None, ["model.family=sd", "model.pipeline=/x", "model.text.dim=8"])


def test_a_folder_without_the_pipeline_parts_is_named(tmp_path):
    from aigc.models.sd import local_pipeline

    (tmp_path / "unet").mkdir()
    (tmp_path / "tokenizer").mkdir()
    with pytest.raises(FileNotFoundError, match=r"vae/, text_encoder/, scheduler/ missing"):
        local_pipeline(str(tmp_path))


def test_a_pipeline_url_is_copied_once_into_the_cache(pipes, tmp_path, monkeypatch):
    import fsspec

    from aigc.models.sd import local_pipeline

    fs = fsspec.filesystem("memory")
    fs.put(str(pipes["eps"]) + "/", "/pipes/eps/", recursive=True)
    monkeypatch.setenv("AIGC_PIPELINE_CACHE", str(tmp_path / "cache"))
    folder = local_pipeline("memory://pipes/eps")
    assert folder.parent == tmp_path / "cache"
    assert folder_bytes(folder) == folder_bytes(pipes["eps"])
    fs.rm("/pipes/eps", recursive=True)  # the second time reads the cache only
    assert local_pipeline("memory://pipes/eps") == folder


# --------------------------------------------------------------------------------------- generate


def test_generate_is_deterministic_for_a_seed_and_validates_options(pipes):
    module = make_module(pipes["v"])  # DDPM: noise is drawn at every step, too
    a = module.generate(PROMPTS, num_samples=2, seed=0, steps=3, guidance=3.0)
    assert a.dtype == torch.uint8 and a.shape == (4, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert torch.equal(a, module.generate(PROMPTS, num_samples=2, seed=0, steps=3, guidance=3.0))
    assert not torch.equal(a, module.generate(PROMPTS, num_samples=2, seed=1, steps=3, guidance=3.0))
    with pytest.raises(ValueError, match="unknown option.*allowed: steps, guidance"):
        module.generate(PROMPTS, seed=0, sampler="ddim")
    with pytest.raises(ValueError, match="steps must be >= 1"):
        module.generate(PROMPTS, seed=0, steps=0)
    with pytest.raises(ValueError, match="guidance must be >= 0"):
        module.generate(PROMPTS, seed=0, guidance=-1.0)


def test_min_snr_weights_match_diffusers_compute_snr(pipes):
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    from aigc.models.sd import min_snr_weights

    sched = DDPMScheduler.from_pretrained(pipes["v"], subfolder="scheduler")
    t = torch.tensor([0, 10, 300, 999])
    snr = compute_snr(sched, t)
    eps = min_snr_weights(sched.alphas_cumprod, t, 5.0, "epsilon")
    v = min_snr_weights(sched.alphas_cumprod, t, 5.0, "v_prediction")
    torch.testing.assert_close(eps, torch.clamp(snr, max=5.0) / snr)
    torch.testing.assert_close(v, torch.clamp(snr, max=5.0) / (snr + 1))
    assert eps[0] < 0.01 and eps[-1] == pytest.approx(1.0)  # low noise (high SNR) is weighted down


# --------------------------------------------------------------------------------------- training


def test_full_fine_tuning_lowers_the_loss_and_checkpoints_leave_the_frozen_parts_out(pipes, tmp_path):
    from aigc.models.export import load_checkpoint

    module = make_module(pipes["eps"], cond_drop_prob=0.0)
    images, captions = toy_batches()
    # Images are encoded by the VAE; a batch already of the latent shape is taken as unscaled latents.
    scaled = module.latents({"image": images}, torch.Generator().manual_seed(0))
    assert scaled.shape == (4, 4, IMAGE_SIZE // 2, IMAGE_SIZE // 2)
    sf = module.vae.config.scaling_factor
    torch.testing.assert_close(module.latents({"image": scaled / sf}), scaled)
    with pytest.raises(ValueError, match=r"expects images \(B, 3, 16, 16\) or latents"):
        module.latents({"image": torch.zeros(2, 3, 8, 8)})
    before = fixed_loss(module, images, captions)
    vae_before = {k: v.clone() for k, v in module.vae.state_dict().items()}
    trainer = fit(module, 30, tmp_path)
    after = fixed_loss(module, images, captions)
    assert after < 0.7 * before, (before, after)
    assert all(torch.equal(v, module.vae.state_dict()[k]) for k, v in vae_before.items())

    trainer.save_checkpoint(tmp_path / "full.ckpt")
    state = torch.load(tmp_path / "full.ckpt", weights_only=True)["state_dict"]
    assert set(state) == set(module.state_dict()) - module.base_weight_keys()
    assert all(k.startswith("unet.") for k in state)  # the trained UNet whole, no VAE, no CLIP
    assert module.base_weight_keys() and all(
        k.startswith(("vae.", "text_encoder.")) for k in module.base_weight_keys()
    )
    loaded = load_checkpoint(tmp_path / "full.ckpt")
    assert torch.equal(loaded.generate(PROMPTS, seed=0, steps=2), module.generate(PROMPTS, seed=0, steps=2))


def test_lora_trains_only_adapters_and_its_checkpoint_is_small(pipes, tmp_path):
    from safetensors.torch import load_file

    from aigc.models.export import export_model, load_checkpoint, load_export

    module = make_module(pipes["v"], lora={"rank": 4, "alpha": 8.0}, snr_gamma=5.0)
    base = {k: v.clone() for k, v in module.state_dict().items() if k in module.base_weight_keys()}
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    images, captions = toy_batches()
    before = fixed_loss(module, images, captions)
    trainer = fit(module, 30, tmp_path)
    assert fixed_loss(module, images, captions) < before

    state = module.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in base.items())  # base weights bit-identical
    assert any(not torch.equal(state[k], torch.zeros_like(state[k])) for k in state if "lora_B" in k)

    ckpt = tmp_path / "lora.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=True)["state_dict"]
    assert set(saved) == set(state) - module.base_weight_keys()
    ratio = ckpt.stat().st_size / folder_bytes(pipes["v"])
    assert ratio < 0.10, ratio

    expected = module.generate(PROMPTS, seed=0, steps=2)
    loaded = load_checkpoint(ckpt)  # base rebuilt from model.pipeline, adapters from the file
    assert torch.equal(loaded.generate(PROMPTS, seed=0, steps=2), expected)
    # The aigc export (registry, serving) holds the adapters too, not the base.
    export = export_model(module, tmp_path / "export")
    assert set(load_file(export / "weights.safetensors")) == set(saved)
    assert torch.equal(load_export(export).generate(PROMPTS, seed=0, steps=2), expected)
    # Only the base keys may be missing: a missing adapter weight is still an error.
    del saved[next(k for k in saved if "lora_A" in k)]
    with pytest.raises(RuntimeError, match="Missing key"):
        loaded.load_state_dict(saved)

    # Lightning resumes from the adapter-only checkpoint (strict loading) and goes on.
    resumed = make_module(pipes["v"], lora={"rank": 4, "alpha": 8.0}, snr_gamma=5.0)
    assert fit(resumed, 32, tmp_path, ckpt_path=ckpt).global_step == 32


# ----------------------------------------------------------------------------------------- export


def diffusers_images(pipe, seed: int, steps: int, guidance: float) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        PROMPTS,
        num_images_per_prompt=2,
        num_inference_steps=steps,
        guidance_scale=guidance,
        height=IMAGE_SIZE,
        width=IMAGE_SIZE,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    ).images  # (N, 3, H, W) in [0, 1]
    return (out * 255).round().to(torch.uint8)


def perturb_trainable(module, scale: float = 0.05) -> None:
    """Move the trainable weights off their start (a LoRA adapter starts as the identity)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def assert_same_images(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape
    assert (ours.int() - theirs.int()).abs().max() <= 1  # uint8 rounding of the same floats
    assert ours.float().std() > 5  # not a blank image, where any two samplers agree


def test_diffusers_loads_the_export_and_draws_the_same_images(pipes, tmp_path):
    from diffusers import StableDiffusionPipeline

    from aigc.models.sd import export_diffusers

    module = make_module(pipes["v"])  # DDPM: the per-step noise draws must line up too
    perturb_trainable(module)
    ours = module.generate(PROMPTS, num_samples=2, seed=5, steps=4, guidance=3.0)
    out = export_diffusers(module, tmp_path / "full")
    pipe = StableDiffusionPipeline.from_pretrained(out)
    assert type(pipe.scheduler).__name__ == "DDPMScheduler"
    assert_same_images(ours, diffusers_images(pipe, seed=5, steps=4, guidance=3.0))


def test_a_lora_export_is_the_adapter_that_diffusers_loads_onto_the_base(pipes, tmp_path):
    import json

    from diffusers import StableDiffusionPipeline

    from aigc.models.sd import BASE_FILE, export_diffusers

    module = make_module(pipes["eps"], lora={"rank": 4, "alpha": 8.0})  # scale alpha / r = 2
    perturb_trainable(module)
    ours = module.generate(PROMPTS, num_samples=2, seed=2, steps=4, guidance=3.0)

    adapter = export_diffusers(module, tmp_path / "adapter")
    assert {p.name for p in adapter.iterdir()} == {"pytorch_lora_weights.safetensors", BASE_FILE}
    assert json.loads((adapter / BASE_FILE).read_text())["pipeline"] == str(pipes["eps"])
    assert folder_bytes(adapter) < 0.1 * folder_bytes(pipes["eps"])
    pipe = StableDiffusionPipeline.from_pretrained(pipes["eps"])
    pipe.load_lora_weights(adapter)
    assert_same_images(ours, diffusers_images(pipe, seed=2, steps=4, guidance=3.0))

    merged = export_diffusers(module, tmp_path / "merged", merge=True)
    pipe = StableDiffusionPipeline.from_pretrained(merged)
    assert not any("lora" in k for k in pipe.unet.state_dict())
    assert_same_images(ours, diffusers_images(pipe, seed=2, steps=4, guidance=3.0))

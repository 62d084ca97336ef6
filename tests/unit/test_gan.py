"""GAN family: shapes, the generate contract, truncation, optimiser split, export, a learning D."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from aigc.config import load_config
from aigc.data.captions import digit_caption
from aigc.models import build_module
from aigc.models.base import warmup_cosine
from aigc.models.export import export_model, load_export
from aigc.models.gan import GANModule, discriminator_loss, generator_loss, sample_latent
from aigc.models.text import Tokenizer
from aigc.training.trainer import build_trainer

ROOT = Path(__file__).resolve().parents[2]
SMALL = {"base_channels": 8, "latent_dim": 8, "cond_dim": 8, "text": {"dim": 16, "layers": 1, "heads": 2}}


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.build([digit_caption(i % 10, f"k{i}") for i in range(60)])


def make(tokenizer: Tokenizer, size: int = 8, channels: int = 1, **model) -> GANModule:
    torch.manual_seed(0)
    return GANModule(
        model={**SMALL, **model},
        tokenizer=tokenizer.to_dict(),
        image_size=size,
        channels=channels,
        trainer={"max_steps": 100},
    )


@pytest.mark.parametrize(("size", "channels"), [(8, 1), (32, 3), (12, 1)])
def test_shapes(tokenizer: Tokenizer, size: int, channels: int) -> None:
    gan = make(tokenizer, size, channels)
    images = gan.generate(["a handwritten digit one", "the number 2 written by hand"], num_samples=3, seed=0)
    assert images.shape == (6, channels, size, size) and images.dtype == torch.uint8
    text = gan.encode_text(["a"] * 4)[2]
    assert gan.discriminator(torch.zeros(4, channels, size, size), text).shape == (4,)


def test_generate_is_deterministic_per_seed(tokenizer: Tokenizer) -> None:
    gan = make(tokenizer)
    a = gan.generate(["a handwritten digit one"], num_samples=4, seed=7)
    assert torch.equal(a, gan.generate(["a handwritten digit one"], num_samples=4, seed=7))
    assert not torch.equal(a, gan.generate(["a handwritten digit one"], num_samples=4, seed=8))
    assert not torch.equal(
        a, gan.generate(["a handwritten digit one"], num_samples=4, seed=7, truncation=0.2)
    )
    assert not torch.equal(a[:1], a[1:2])  # different latents within one call


def test_generate_rejects_bad_options(tokenizer: Tokenizer) -> None:
    gan = make(tokenizer)
    with pytest.raises(ValueError, match="truncation"):
        gan.generate(["x"], temperature=1.0)
    with pytest.raises(ValueError, match="truncation must be > 0"):
        gan.generate(["x"], truncation=0.0)


def test_truncated_latent_is_bounded_and_seeded() -> None:
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    z = sample_latent(2000, 8, g1, torch.device("cpu"), truncation=0.5)
    assert z.abs().max() <= 0.5
    assert z.std() > 0.2  # resampled inside the bound, not clamped onto it
    assert (z.abs() == 0.5).float().mean() < 0.01
    assert torch.equal(z, sample_latent(2000, 8, g2, torch.device("cpu"), truncation=0.5))


def test_losses() -> None:
    real, fake, wrong = torch.tensor([2.0, 0.0]), torch.tensor([-2.0, 0.0]), torch.tensor([0.5, -3.0])
    # hinge: relu(1 - real) + relu(1 + fake) + w * relu(1 + wrong), each a batch mean
    assert discriminator_loss(real, fake, wrong, "hinge", 0.5).item() == pytest.approx(0.5 + 0.5 + 0.5 * 0.75)
    assert generator_loss(fake, "hinge").item() == pytest.approx(1.0)
    sp = torch.nn.functional.softplus
    expected = sp(-real).mean() + sp(fake).mean() + 0.25 * sp(wrong).mean()
    ns = discriminator_loss(real, fake, wrong, "non_saturating", 0.25)
    assert ns.item() == pytest.approx(expected.item())
    assert generator_loss(fake, "non_saturating").item() == pytest.approx(sp(-fake).mean().item())


def test_optimisers_split_players_and_schedule_in_optimiser_steps(tokenizer: Tokenizer) -> None:
    gan = make(tokenizer, d_steps=2)
    (opt_g, opt_d), scheds = gan.configure_optimizers()
    ids = lambda opt: {id(p) for group in opt.param_groups for p in group["params"]}  # noqa: E731
    assert ids(opt_g) == {id(p) for p in gan.generator.parameters()}
    text_ids = {id(p) for p in gan.text_encoder.parameters()}
    assert text_ids <= ids(opt_d) and not text_ids & ids(opt_g)  # D's optimiser trains the encoder
    assert not {id(p) for p in gan.generator_ema.parameters()} & (ids(opt_g) | ids(opt_d))
    # One scheduler step per batch = d_steps + 1 optimiser steps of the cosine over max_steps.
    assert gan.batch_lr_lambda(10) == pytest.approx(warmup_cosine(30, 0, 100, "cosine"))
    assert len(scheds) == 2


def _trainer(gan: GANModule, max_steps: int) -> pl.Trainer:
    return build_trainer(gan, max_steps=max_steps)


@pytest.mark.timeout(60)
def test_training_steps_count_both_optimisers_and_d_learns(tokenizer: Tokenizer, bar_batch) -> None:
    pl.seed_everything(0, verbose=False)
    gan = make(tokenizer, d_steps=2)
    gan.trainer_cfg.lr = 2e-3
    batch = bar_batch()
    z = torch.randn(16, gan.model_cfg.latent_dim, generator=torch.Generator().manual_seed(1))

    def d_loss() -> float:
        with torch.no_grad():
            text = gan.encode_text(batch["caption"])[2]
            d_real, d_fake, d_wrong = gan._d_logits(batch["image"], gan.generator(z, text), text)
            return discriminator_loss(d_real, d_fake, d_wrong, "hinge", 0.5).item()

    before = d_loss()
    ema_before = [p.clone() for p in gan.generator_ema.parameters()]
    trainer = _trainer(gan, max_steps=60)
    trainer.fit(gan, DataLoader([batch] * 100, batch_size=None))
    # global_step counts every optimiser step: 60 steps = 20 batches of 2 D + 1 G updates.
    assert trainer.global_step == 60
    assert int(gan.ema_updates) == 20
    assert d_loss() < before - 0.2
    assert any(not torch.equal(a, b) for a, b in zip(ema_before, gan.generator_ema.parameters(), strict=True))
    for key in ("train/loss", "train/loss_d", "train/loss_g"):
        assert torch.isfinite(trainer.callback_metrics[key])
    gen_d = trainer.callback_metrics["train/loss_d"] + trainer.callback_metrics["train/loss_g"]
    assert trainer.callback_metrics["train/loss"].item() == pytest.approx(gen_d.item(), rel=1e-5)


def test_validation_logs_val_loss(tokenizer: Tokenizer, bar_batch) -> None:
    gan = make(tokenizer)
    trainer = _trainer(gan, max_steps=1)
    trainer.validate(gan, DataLoader([bar_batch()] * 2, batch_size=None), verbose=False)
    first = trainer.callback_metrics["val/loss"].item()
    assert first > 0
    trainer.validate(gan, DataLoader([bar_batch()] * 2, batch_size=None), verbose=False)
    assert trainer.callback_metrics["val/loss"].item() == pytest.approx(first)  # fixed val latents


def test_shipped_config_builds(tokenizer: Tokenizer) -> None:
    cfg = load_config(ROOT / "models" / "gan.yaml")
    assert cfg.model.family == "gan"
    module = build_module(cfg, tokenizer, cfg.data.image_size, cfg.data.channels)
    assert isinstance(module, GANModule)
    assert not module.automatic_optimization
    assert module.generate(["a handwritten digit one"], seed=0).shape == (1, 1, 8, 8)


def test_export_round_trip(tokenizer: Tokenizer, tmp_path: Path) -> None:
    gan = make(tokenizer, size=16, channels=3)
    with torch.no_grad():  # make the EMA generator differ from the raw one
        for p in gan.generator_ema.parameters():
            p.add_(0.01)
    loaded = load_export(export_model(gan, tmp_path / "gan"))
    prompts = ["a handwritten digit one", "the number 7 written by hand"]
    assert torch.equal(
        gan.generate(prompts, num_samples=2, seed=3), loaded.generate(prompts, num_samples=2, seed=3)
    )
    assert torch.equal(
        gan.generate(prompts, seed=3, truncation=0.7), loaded.generate(prompts, seed=3, truncation=0.7)
    )

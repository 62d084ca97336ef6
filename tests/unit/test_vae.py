"""VAE family: shapes, the generate contract, the ELBO terms, export, loss going down."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from aigc.config import load_config
from aigc.data.captions import digit_caption
from aigc.models import build_module
from aigc.models.export import export_model, load_export
from aigc.models.text import Tokenizer
from aigc.models.vae import VAEModule, gaussian_nll, kl_per_dim
from aigc.training.trainer import build_trainer

ROOT = Path(__file__).resolve().parents[2]
SMALL = {"base_channels": 8, "latent_dim": 4, "cond_dim": 8, "text": {"dim": 16, "layers": 1, "heads": 2}}


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.build([digit_caption(i % 10, f"k{i}") for i in range(60)])


def make(
    tokenizer: Tokenizer, size: int = 8, channels: int = 1, trainer: dict | None = None, **model
) -> VAEModule:
    torch.manual_seed(0)
    return VAEModule(
        model={**SMALL, **model},
        tokenizer=tokenizer.to_dict(),
        image_size=size,
        channels=channels,
        trainer=trainer or {"max_steps": 100},
    )


@pytest.mark.parametrize(("size", "channels"), [(8, 1), (32, 3), (12, 3)])
def test_shapes(tokenizer: Tokenizer, size: int, channels: int) -> None:
    vae = make(tokenizer, size, channels)
    images = vae.generate(["a handwritten digit one", "the number 2 written by hand"], num_samples=3, seed=0)
    assert images.shape == (6, channels, size, size) and images.dtype == torch.uint8
    recon, kl = vae.elbo_terms(torch.zeros(5, channels, size, size), ["a"] * 5)
    assert recon.shape == (5,) and kl.shape == (5, SMALL["latent_dim"])


def test_generate_is_deterministic_per_seed(tokenizer: Tokenizer) -> None:
    vae = make(tokenizer)
    a = vae.generate(["a handwritten digit one"], num_samples=4, seed=7)
    assert torch.equal(a, vae.generate(["a handwritten digit one"], num_samples=4, seed=7))
    assert not torch.equal(a, vae.generate(["a handwritten digit one"], num_samples=4, seed=8))
    assert not torch.equal(
        a, vae.generate(["a handwritten digit one"], num_samples=4, seed=7, temperature=3.0)
    )
    # temperature 0 is the prior mean: the same image whatever the seed, but still per prompt
    z0 = vae.generate(["a handwritten digit one", "the number 8 written by hand"], seed=1, temperature=0.0)
    assert torch.equal(
        z0, vae.generate(["a handwritten digit one", "the number 8 written by hand"], seed=2, temperature=0.0)
    )


def test_generate_rejects_bad_options(tokenizer: Tokenizer) -> None:
    vae = make(tokenizer)
    with pytest.raises(ValueError, match="temperature"):
        vae.generate(["x"], truncation=1.0)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        vae.generate(["x"], temperature=-1.0)


def test_elbo_terms() -> None:
    x = torch.zeros(2, 1, 2, 2)
    # fixed sigma: sum over 4 pixels of 0.5 * (d / s)^2 + log s + 0.5 log 2 pi
    nll = gaussian_nll(x, x + 0.5, sigma=0.5)
    assert nll.tolist() == pytest.approx([4 * (0.5 + math.log(0.5) + 0.5 * math.log(2 * math.pi))] * 2)
    # analytic sigma = sqrt(batch MSE) minimises the NLL over sigma
    mean = x + torch.tensor([0.1, 0.3]).view(2, 1, 1, 1)
    best = gaussian_nll(x, mean, None).sum()
    mse = mean.pow(2).mean().item()
    assert best.item() == pytest.approx(gaussian_nll(x, mean, math.sqrt(mse)).sum().item(), rel=1e-5)
    for s in (0.5 * math.sqrt(mse), 2 * math.sqrt(mse)):
        assert best < gaussian_nll(x, mean, s).sum()
    assert kl_per_dim(torch.zeros(3, 2), torch.zeros(3, 2)).abs().max() == 0
    kl = kl_per_dim(torch.tensor([[1.0]]), torch.tensor([[math.log(4.0)]]))
    assert kl.item() == pytest.approx(0.5 * (1 + 4 - 1 - math.log(4.0)))


def test_kl_warmup_ramps_to_beta(tokenizer: Tokenizer) -> None:
    assert make(tokenizer, beta=0.5).kl_weight() == 0.5
    vae = make(tokenizer, beta=0.5, kl_warmup_steps=10)
    assert vae.kl_weight() == pytest.approx(0.05)  # global_step 0, no trainer attached


@pytest.mark.timeout(60)
def test_a_few_steps_lower_the_loss(tokenizer: Tokenizer, bar_batch) -> None:
    pl.seed_everything(0, verbose=False)
    vae = make(tokenizer, trainer={"max_steps": 30, "lr": 2e-3}, free_bits=0.1, kl_warmup_steps=5)
    batch = bar_batch()

    def neg_elbo() -> float:
        with torch.no_grad():
            recon, kl = vae.elbo_terms(batch["image"], batch["caption"], torch.Generator().manual_seed(0))
            return (recon.mean() + kl.sum(1).mean()).item()

    before = neg_elbo()
    trainer = build_trainer(vae, limit_val_batches=1, val_check_interval=10)
    trainer.fit(vae, DataLoader([batch] * 40, batch_size=None), DataLoader([batch], batch_size=None))
    assert trainer.global_step == 30
    assert neg_elbo() < before - 10  # nats per image (87 -> 62 here)
    for key in ("train/loss", "train/recon", "train/kl", "val/loss", "val/recon", "val/kl"):
        assert torch.isfinite(trainer.callback_metrics[key]), key
    m = trainer.callback_metrics
    assert m["val/loss"].item() == pytest.approx((m["val/recon"] + m["val/kl"]).item(), rel=1e-4)


def test_validation_ignores_padding_rows(tokenizer: Tokenizer, bar_batch) -> None:
    vae = make(tokenizer)
    batch = bar_batch()
    padded = dict(
        batch,
        image=torch.cat([batch["image"], 5 + batch["image"][:4]]),
        caption=batch["caption"] + batch["caption"][:4],
        valid=torch.cat([batch["valid"], torch.zeros(4, dtype=torch.bool)]),
    )
    trainer = build_trainer(vae)
    trainer.validate(vae, DataLoader([batch], batch_size=None), verbose=False)
    clean = trainer.callback_metrics["val/loss"].item()
    trainer.validate(vae, DataLoader([padded], batch_size=None), verbose=False)
    assert trainer.callback_metrics["val/loss"].item() == pytest.approx(clean, rel=1e-5)


def test_shipped_config_builds(tokenizer: Tokenizer) -> None:
    cfg = load_config(ROOT / "models" / "vae.yaml")
    assert cfg.model.family == "vae"
    module = build_module(cfg, tokenizer, cfg.data.image_size, cfg.data.channels)
    assert isinstance(module, VAEModule)
    assert module.generate(["a handwritten digit one"], seed=0).shape == (1, 1, 8, 8)


def test_export_round_trip(tokenizer: Tokenizer, tmp_path: Path) -> None:
    vae = make(tokenizer, size=16, channels=3)
    loaded = load_export(export_model(vae, tmp_path / "vae"))
    prompts = ["a handwritten digit one", "the number 7 written by hand"]
    assert torch.equal(
        vae.generate(prompts, num_samples=2, seed=3), loaded.generate(prompts, num_samples=2, seed=3)
    )
    assert torch.equal(
        vae.generate(prompts, seed=3, temperature=0.5), loaded.generate(prompts, seed=3, temperature=0.5)
    )

"""The 32/64 px RGB configs (models/<family>-rgb<size>.yaml) load, build, train and generate as shipped.

Only the batch size (2) and the sampling cost (``steps=2`` for diffusion) are shrunk: the nets are the
shipped sizes, so a config whose net cannot run at its resolution fails here, not in a GPU job.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from aigc.config import load_config
from aigc.models import build_module
from aigc.models.nets.unet import UNet, UNetConfig
from aigc.models.text import Tokenizer
from aigc.training.trainer import build_trainer

ROOT = Path(__file__).resolve().parents[2]
# Pixel-space configs; the latent ones (models/latent-*-rgb*.yaml) train on `aigc data encode` output
# and are exercised by tests/quality/test_emoji_quality.py and tests/integration/test_latents.py.
CONFIGS = sorted(p for p in (ROOT / "models").glob("*-rgb*.yaml") if not p.stem.startswith("latent-"))
# OpenMoji-style captions (lower-cased Unicode names), the longest of them among the longest names.
CAPTIONS = [
    "hot beverage",
    "face with stuck-out tongue and tightly-closed eyes",
    "clockwise rightwards and leftwards open circle arrows with circled one overlay",
    "red apple",
]
# Options that make generate() cheap without changing the net: fewer diffusion steps, and no
# guidance for the autoregressive family (which would double its 3072 sequential decoding steps' batch).
CHEAP = {"diffusion": {"steps": 2}, "autoregressive": {"guidance": 1.0}}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/unit/conftest.py


def test_every_family_has_its_rgb_configs() -> None:
    names = {p.stem for p in CONFIGS}
    expected = {f"{family}-rgb{size}" for family in ("diffusion", "gan", "vae") for size in (32, 64)}
    # Pixel-space autoregression stops at 32 px: 64x64x3 is 12288 tokens (models/autoregressive.md).
    assert names == expected | {"autoregressive-rgb32"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_rgb_config_trains_a_step_and_generates(path: Path) -> None:
    cfg = load_config(path)
    size = int(path.stem.rpartition("-rgb")[2])
    data = cfg.data
    assert (data.name, data.source, data.image_size, data.channels) == (f"emoji{size}", "openmoji", size, 3)
    tokenizer = Tokenizer.build(CAPTIONS)
    longest = max(len(tokenizer.tokenize(c)) for c in CAPTIONS) + 2  # + <bos>, <eos>
    assert longest <= cfg.model.text.max_tokens, "the longest Unicode names would be cut"

    torch.manual_seed(0)
    module = build_module(cfg, tokenizer, size, 3)
    before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    g = torch.Generator().manual_seed(0)
    batch = {
        "image": torch.rand(2, 3, size, size, generator=g) * 2 - 1,  # (B, 3, S, S) in [-1, 1]
        "caption": CAPTIONS[:2],
        "valid": torch.ones(2, dtype=torch.bool),
    }
    # One batch through the Trainer every run uses (manual optimisation for the GAN included).
    # bf16 autocast is a GPU switch: on the CPU the Trainer says so and trains in 32-bit.
    cpu_precision = (
        pytest.warns(UserWarning, match="ignored on CPU") if cfg.trainer.precision != "32" else nullcontext()
    )
    with cpu_precision:
        trainer = build_trainer(module, max_steps=-1, max_epochs=1, limit_val_batches=0)
    trainer.fit(module, train_dataloaders=DataLoader([batch], batch_size=None))

    loss = trainer.callback_metrics["train/loss"]
    assert torch.isfinite(loss), f"{path.name}: loss {loss}"
    after = dict(module.named_parameters())
    assert any(not torch.equal(before[n], after[n].detach()) for n in before), "the step changed no weight"

    images = module.generate(["hot beverage"], 2, seed=0, **CHEAP.get(cfg.model.family, {}))
    assert images.dtype == torch.uint8 and images.shape == (2, 3, size, size)


@pytest.mark.parametrize(("size", "mults", "cross_levels"), [(8, (1, 2), [8, 4]), (64, (1,) * 5, [16, 8, 4])])
def test_unet_cross_attends_at_16px_and_below_only(size: int, mults: tuple, cross_levels: list[int]) -> None:
    """Cross-attention where the resolution is <= 16x16 (every level of a digits UNet), and the
    text tokens still reach a 64 px UNet's output through those levels."""
    torch.manual_seed(0)
    net = UNet(UNetConfig(in_channels=3, image_size=size, base_channels=8, channel_mults=mults, text_dim=16))
    sides = [size // 2**i for i in range(net.levels)]  # the down levels' sides; the up levels reverse them
    down = [s for s, level in zip(sides, net.down, strict=True) if level.attn is not None]
    up = [s for s, level in zip(sides[::-1], net.up, strict=True) if level.attn is not None]
    assert down == cross_levels and up == cross_levels[::-1]
    with torch.no_grad():
        for p in net.parameters():  # zero-initialised output layers would hide any dependence
            p.normal_(0.0, 0.1)
    x, t = torch.randn(2, 3, size, size), torch.tensor([10, 500])
    tokens, mask, pooled = torch.randn(2, 5, 16), torch.ones(2, 5, dtype=torch.bool), torch.randn(2, 16)
    out = net(x, t, tokens, mask, pooled)
    assert not torch.allclose(out, net(x, t, tokens.flip(0), mask, pooled))  # same pooled, other tokens

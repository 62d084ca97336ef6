"""The diffusion family: the UNet, the LightningModule's loss, EMA, guidance and ``generate``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from aigc import project_root
from aigc.config import load_config
from aigc.data.captions import digit_caption, heldout_captions
from aigc.models import build_module
from aigc.models.diffusion import DiffusionModule
from aigc.models.export import export_model, load_export
from aigc.models.nets.unet import UNet, UNetConfig, num_levels
from aigc.models.schedulers import DDIMScheduler, DDPMScheduler
from aigc.models.text import Tokenizer

CAPTIONS = [digit_caption(i % 10, f"k{i}") for i in range(60)]
TINY = {
    "text": {"dim": 32, "layers": 1, "heads": 2, "max_tokens": 12},
    "base_channels": 16,
    "channel_mults": [1, 2],
    "heads": 2,
    "timesteps": 100,
    "sample_steps": 4,
}


def _module(size: int = 8, channels: int = 1, **model) -> DiffusionModule:
    torch.manual_seed(0)
    tok = Tokenizer.build(CAPTIONS).to_dict()
    return DiffusionModule(
        model={**TINY, **model},
        tokenizer=tok,
        image_size=size,
        channels=channels,
        trainer={"lr": 2e-3, "max_steps": 100, "warmup_steps": 0},
    )


def _randomise(net: torch.nn.Module) -> None:
    """Give zero-initialised layers (output convs, attention outputs) weights so every path matters."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            if torch.all(p == 0):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


# ------------------------------------------------------------------------------------------ UNet
@pytest.mark.parametrize(
    ("size", "requested", "expected"),
    [(8, 2, 2), (8, 5, 3), (32, 5, 5), (32, 9, 5), (64, 2, 2), (9, 3, 1), (12, 4, 3)],
)
def test_num_levels_never_goes_below_2x2(size: int, requested: int, expected: int) -> None:
    assert num_levels(size, requested) == expected


@pytest.mark.parametrize("conditioning", ["cross_attn", "film"])
@pytest.mark.parametrize(("size", "channels"), [(8, 1), (8, 3), (32, 1), (32, 3), (12, 1)])
def test_unet_keeps_the_image_shape(conditioning: str, size: int, channels: int) -> None:
    net = UNet(
        UNetConfig(
            in_channels=channels,
            image_size=size,
            base_channels=8,
            channel_mults=(1, 2, 2),
            text_dim=16,
            conditioning=conditioning,
            heads=2,
        )
    )
    x = torch.randn(2, channels, size, size)
    out = net(
        x,
        torch.tensor([0, 99]),
        torch.randn(2, 5, 16),
        torch.ones(2, 5, dtype=torch.bool),
        torch.randn(2, 16),
    )
    assert out.shape == x.shape
    assert torch.all(out == 0)  # zero-initialised output: the untrained model predicts 0


def test_unet_uses_time_and_text_and_ignores_padded_tokens() -> None:
    torch.manual_seed(0)
    net = UNet(UNetConfig(base_channels=8, text_dim=16, heads=2))
    _randomise(net)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 500])
    tokens, pooled = torch.randn(2, 6, 16), torch.randn(2, 16)
    mask = torch.tensor([[True] * 3 + [False] * 3, [True] * 6])
    out = net(x, t, tokens, mask, pooled)
    assert not torch.allclose(out, net(x, t + 200, tokens, mask, pooled))
    assert not torch.allclose(out, net(x, t, tokens.flip(0), mask, pooled))  # cross-attention reads tokens
    junk = tokens.clone()
    junk[0, 3:] = torch.randn(3, 16) * 100  # only padded positions change
    assert torch.allclose(out, net(x, t, junk, mask, pooled), atol=1e-5)


def test_unet_rejects_wrong_channel_count() -> None:
    net = UNet(UNetConfig(in_channels=3, base_channels=8, text_dim=16, heads=2))
    with pytest.raises(ValueError, match="expected 3 channels"):
        net(
            torch.randn(1, 1, 8, 8),
            torch.tensor([0]),
            torch.randn(1, 2, 16),
            torch.ones(1, 2, dtype=torch.bool),
            torch.randn(1, 16),
        )


# ---------------------------------------------------------------------------------- module
def test_shipped_yaml_builds_a_diffusion_module() -> None:
    cfg = load_config(project_root() / "models" / "diffusion.yaml")
    assert cfg.model.family == "diffusion"
    m = build_module(cfg, Tokenizer.build(CAPTIONS), cfg.data.image_size, cfg.data.channels)
    assert isinstance(m, DiffusionModule)
    assert (
        m.unet.cfg.base_channels == cfg.model.base_channels and m.scheduler.prediction == cfg.model.prediction
    )
    img = m.generate(["a handwritten digit one"], seed=0, steps=2)
    assert img.shape == (1, cfg.data.channels, cfg.data.image_size, cfg.data.image_size)


@pytest.mark.parametrize(("size", "channels"), [(8, 1), (8, 3), (32, 1), (32, 3)])
def test_generate_shapes_and_dtype(size: int, channels: int) -> None:
    m = _module(size, channels)
    _randomise(m.ema_unet)
    imgs = m.generate(["a handwritten digit one", ""], num_samples=2, seed=0, steps=2)
    assert imgs.shape == (4, channels, size, size) and imgs.dtype == torch.uint8


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_generate_is_deterministic_for_a_seed(sampler: str) -> None:
    m = _module()
    _randomise(m.ema_unet)
    a = m.generate(["a handwritten digit one"], num_samples=3, seed=5, sampler=sampler)
    assert torch.equal(a, m.generate(["a handwritten digit one"], num_samples=3, seed=5, sampler=sampler))
    assert not torch.equal(a, m.generate(["a handwritten digit one"], num_samples=3, seed=6, sampler=sampler))
    assert not torch.equal(a[0], a[1])  # each sample has its own noise


def test_guidance_batches_conditional_and_unconditional_in_one_pass() -> None:
    m = _module().eval()
    _randomise(m.ema_unet)
    _randomise(m.ema_text_encoder)
    x = torch.randn(3, 1, 8, 8)
    cond = m._encode(
        ["a handwritten digit one", "the number 2 written by hand", "a drawing of the digit 3"], ema=True
    )
    uncond = m._encode([""] * 3, ema=True)
    t = 50
    tt = torch.full((3,), t)
    with torch.no_grad():
        out_c, out_u = m.ema_unet(x, tt, *cond), m.ema_unet(x, tt, *uncond)
        assert torch.allclose(m._guided(x, t, cond, uncond, 3.0), out_u + 3.0 * (out_c - out_u), atol=1e-5)
        assert torch.allclose(m._guided(x, t, cond, None, 1.0), out_c)
        assert torch.allclose(m._guided(x, t, cond, uncond, 0.0), out_u)
    # Guidance changes the samples; w = 1 and w = 0 are the conditional and unconditional models.
    g3 = m.generate(["a handwritten digit one"], seed=0, guidance=3.0)
    assert not torch.equal(g3, m.generate(["a handwritten digit one"], seed=0, guidance=1.0))
    assert torch.equal(
        m.generate([""], seed=0, guidance=1.0), m.generate(["a handwritten digit one"], seed=0, guidance=0.0)
    )


def test_generate_rejects_bad_options() -> None:
    m = _module()
    with pytest.raises(ValueError, match="unknown option"):
        m.generate(["x"], seed=0, temperature=1.0)
    with pytest.raises(ValueError, match="steps must be in 1..100"):
        m.generate(["x"], seed=0, steps=101)
    with pytest.raises(ValueError, match="sampler"):
        m.generate(["x"], seed=0, sampler="euler")
    with pytest.raises(ValueError, match="guidance"):
        m.generate(["x"], seed=0, guidance=-1.0)


def test_the_sampler_option_picks_the_scheduler_class() -> None:
    """model.sampler is the default; generate(sampler=...) looks the class up in SCHEDULERS."""
    assert type(_module(sampler="ddpm").scheduler) is DDPMScheduler
    m = _module()  # sampler: ddim (the default)
    assert type(m.scheduler) is DDIMScheduler and type(m._new_scheduler("ddpm")) is DDPMScheduler
    _randomise(m.ema_unet)
    ddim = m.generate(["a handwritten digit one"], seed=1)
    assert torch.equal(ddim, m.generate(["a handwritten digit one"], seed=1, sampler="ddim"))
    assert not torch.equal(ddim, m.generate(["a handwritten digit one"], seed=1, sampler="ddpm"))


def test_condition_dropout_replaces_captions_with_the_empty_caption() -> None:
    g = torch.Generator().manual_seed(0)
    caps = [f"a handwritten digit {i}" for i in range(4000)]
    assert _module(cond_drop_prob=0.0).drop_captions(caps, g) == caps
    assert _module(cond_drop_prob=1.0).drop_captions(caps, g) == [""] * len(caps)
    dropped = _module(cond_drop_prob=0.25).drop_captions(caps, g)
    assert all(d in ("", c) for d, c in zip(dropped, caps, strict=True))
    assert 0.22 < dropped.count("") / len(caps) < 0.28


def test_ema_update_follows_the_warmed_up_decay_and_is_in_the_state_dict() -> None:
    m = _module(ema_decay=0.9)
    keys = m.state_dict().keys()
    assert any(k.startswith("ema_unet.") for k in keys) and any(
        k.startswith("ema_text_encoder.") for k in keys
    )
    assert "ema_updates" in keys
    with torch.no_grad():
        for p in list(m.unet.parameters()) + list(m.text_encoder.parameters()):
            p.add_(1.0)
    before = [p.clone() for p in m.ema_unet.parameters()]
    m.update_ema()  # decay min(0.9, 1/10) = 0.1: moves 90 % of the way
    for b, e in zip(before, m.ema_unet.parameters(), strict=True):
        assert torch.allclose(e, b + 0.9, atol=1e-6)
    ema_text = next(m.ema_text_encoder.parameters())
    assert torch.allclose(ema_text, next(m.text_encoder.parameters()) - 0.1, atol=1e-6)
    for _ in range(200):
        m.update_ema()
    assert int(m.ema_updates) == 201
    assert all(not p.requires_grad for p in m.ema_unet.parameters())


@pytest.mark.parametrize("encoder", ["scratch", "minilm"])
def test_a_few_optimisation_steps_on_a_fixed_batch_lower_the_loss(encoder: str) -> None:
    # minilm: the frozen pretrained text encoder; only its projection and blocks train.
    m = _module(text={**TINY["text"], "encoder": encoder})
    digits = load_digits()  # bundled with scikit-learn: 8x8 images in 0..16
    x0 = torch.from_numpy(digits.images[:16].astype(np.float32) / 8 - 1)[:, None]  # (16, 1, 8, 8)
    caps = [digit_caption(int(y), f"k{i}") for i, y in enumerate(digits.target[:16])]

    def fixed_loss() -> float:
        with torch.no_grad():
            return m.loss(x0, caps, generator=torch.Generator().manual_seed(1)).mean().item()

    start = fixed_loss()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(40):
        opt.zero_grad()
        m.training_step({"image": x0, "caption": caps}, 0).backward()
        opt.step()
    assert fixed_loss() < 0.7 * start


def test_training_step_rejects_images_of_the_wrong_shape() -> None:
    m = _module()
    with pytest.raises(ValueError, match=r"batch\['image'\] has shape \(2, 3, 8, 8\)"):
        m.training_step({"image": torch.zeros(2, 3, 8, 8), "caption": ["a", "b"]}, 0)


def test_validation_loss_is_fixed_seed_and_skips_padding() -> None:
    m = _module()
    x0 = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    batch = {"image": x0, "caption": CAPTIONS[:6], "valid": torch.tensor([True] * 4 + [False] * 2)}
    with torch.no_grad():
        a = m.validation_step(batch, 0)
        assert torch.equal(a, m.validation_step(batch, 0))
        g = torch.Generator().manual_seed(1234)
        per_sample = m.loss(x0, CAPTIONS[:6], generator=g, ema=True)
    assert torch.allclose(a, per_sample[:4].mean())


def test_export_round_trip_keeps_samples_and_defaults(tmp_path) -> None:
    m = _module(conditioning="film", prediction="epsilon", beta_schedule="linear", guidance=2.0)
    _randomise(m.ema_unet)
    out = export_model(m, tmp_path / "export")
    loaded = load_export(out)
    assert isinstance(loaded, DiffusionModule) and loaded.model_cfg == m.model_cfg
    prompts = [heldout_captions(3), ""]
    assert torch.equal(
        m.generate(prompts, num_samples=2, seed=9), loaded.generate(prompts, num_samples=2, seed=9)
    )


def test_training_and_sampling_work_under_bf16_autocast() -> None:
    m = _module()
    _randomise(m.ema_unet)
    x0 = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = m.training_step({"image": x0, "caption": CAPTIONS[:4]}, 0)
        imgs = m.generate(["a handwritten digit one"], num_samples=2, seed=0, sampler="ddpm")
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in m.unet.parameters())
    assert imgs.dtype == torch.uint8 and imgs.shape == (2, 1, 8, 8)
    assert m.scheduler.alphas_cumprod.dtype == torch.float32

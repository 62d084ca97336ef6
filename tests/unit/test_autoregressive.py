"""Autoregressive family: the GPT's KV cache, the pixel-token sequence, generate() and exports."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from aigc.config import AutoregressiveConfig, ConfigError, load_config
from aigc.models import build_module
from aigc.models.autoregressive import AutoregressiveModule, dequantise, quantise
from aigc.models.base import drop_captions
from aigc.models.export import export_model, load_export
from aigc.models.nets.transformer import GPT, GPTConfig
from aigc.models.text import Tokenizer
from aigc.training.trainer import build_trainer

ROOT = Path(__file__).resolve().parents[2]
CAPTIONS = ["a handwritten digit seven", "the number 3 written by hand", "a drawing of the digit 1"]
TINY = {"dim": 32, "layers": 2, "heads": 2, "text": {"dim": 16, "layers": 1, "heads": 2, "max_tokens": 10}}


def make(size: int = 8, channels: int = 1, **overrides) -> AutoregressiveModule:
    torch.manual_seed(0)
    model = AutoregressiveConfig(**{**TINY, **overrides}).model_dump(mode="json")
    return AutoregressiveModule(model, Tokenizer.build(CAPTIONS).to_dict(), size, channels)


def images(b: int, channels: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, channels, size, size, generator=g) * 2 - 1


# ------------------------------------------------------------------------------------------ the GPT
def test_kv_cache_decoding_matches_full_forward() -> None:
    torch.manual_seed(0)
    gpt = GPT(
        GPTConfig(vocab_size=11, out_size=10, block_size=24, n_layer=2, n_head=2, n_embd=32, prefix_dim=8)
    ).eval()
    prefix = torch.randn(3, 5, 8)  # (B, P, D)
    prefix_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    idx = torch.randint(0, 11, (3, 12))
    with torch.no_grad():
        full, _ = gpt(idx, prefix=prefix, prefix_mask=prefix_mask)  # (B, P + T, V)
        step, cache = gpt(idx[:, :1], prefix=prefix, prefix_mask=prefix_mask)
        cached = [step[:, -1]]
        for t in range(1, idx.shape[1]):
            step, cache = gpt(idx[:, t : t + 1], cache=cache)
            cached.append(step[:, -1])
    assert full.shape == (3, 17, 10)
    assert cache.length == 17
    torch.testing.assert_close(torch.stack(cached, 1), full[:, 5:], atol=1e-5, rtol=1e-4)


def test_padded_prefix_positions_are_ignored_and_attention_is_causal() -> None:
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=7, block_size=16, n_layer=2, n_head=2, n_embd=16, prefix_dim=4)).eval()
    prefix = torch.randn(2, 4, 4)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    idx = torch.randint(0, 7, (2, 6))
    with torch.no_grad():
        base, _ = gpt(idx, prefix, mask)
        junk = prefix.clone()
        junk[:, 2:] = 100.0  # features at padded positions must not leak into the tokens
        same, _ = gpt(idx, junk, mask)
        later = idx.clone()
        later[:, 4] = (later[:, 4] + 1) % 7  # a later token must not change earlier logits
        causal, _ = gpt(later, prefix, mask)
    torch.testing.assert_close(same[:, 4:], base[:, 4:])
    torch.testing.assert_close(causal[:, : 4 + 4], base[:, : 4 + 4])
    assert not torch.allclose(causal[:, 8:], base[:, 8:])


def test_sequence_longer_than_block_size_is_an_error() -> None:
    gpt = GPT(GPTConfig(vocab_size=5, block_size=4, n_layer=1, n_head=1, n_embd=8))
    with pytest.raises(ValueError, match="block_size=4"):
        gpt(torch.zeros(1, 5, dtype=torch.long))


# ------------------------------------------------------------------------------- pixels as tokens
def test_tokens_are_raster_order_with_channels_interleaved() -> None:
    x = torch.tensor([-1.0, 0.0, 1.0]).view(1, 3, 1, 1).expand(1, 3, 2, 2).clone()  # (1, 3, 2, 2)
    x[0, :, 0, 1] = torch.tensor([1.0, 1.0, -1.0])
    tokens = quantise(x, 16)
    assert tokens.shape == (1, 12)
    assert tokens[0, :6].tolist() == [0, 8, 15, 15, 15, 0]  # pixel (0,0) r g b, then pixel (0,1)
    levels = torch.randint(0, 16, (2, 3 * 4 * 4))
    assert torch.equal(quantise(dequantise(levels, 16, 3, 4), 16), levels)


@pytest.mark.parametrize("size,channels", [(8, 1), (8, 3), (32, 1), (32, 3)])
def test_logits_cover_every_image_token(size: int, channels: int) -> None:
    m = make(size, channels)
    logits, target = m.image_logits(images(2, channels, size), CAPTIONS[:2])
    assert logits.shape == (2, size * size * channels, 16)
    assert target.shape == (2, size * size * channels)
    assert target.min() >= 0 and target.max() < 16


@pytest.mark.parametrize("size,channels,prompts", [(8, 3, 2), (32, 1, 1)])
def test_generate_shapes(size: int, channels: int, prompts: int) -> None:
    out = make(size, channels).generate(CAPTIONS[:prompts], num_samples=2, seed=0)
    assert out.shape == (2 * prompts, channels, size, size) and out.dtype == torch.uint8


def test_larger_than_32_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"image_size=64.*32x32"):
        make(64, 1)


# ------------------------------------------------------------------------------------- generate
def test_generate_is_deterministic_for_a_seed() -> None:
    m = make()
    a = m.generate(CAPTIONS, num_samples=3, seed=7)
    assert a.shape == (9, 1, 8, 8)
    assert torch.equal(a, m.generate(CAPTIONS, num_samples=3, seed=7))
    assert not torch.equal(a, m.generate(CAPTIONS, num_samples=3, seed=8))
    g = m.generate(CAPTIONS, num_samples=2, seed=7, guidance=3.0, temperature=0.8, top_k=4)
    assert torch.equal(g, m.generate(CAPTIONS, num_samples=2, seed=7, guidance=3.0, temperature=0.8, top_k=4))


def test_top_k_one_is_greedy_whatever_the_seed() -> None:
    m = make()
    a = m.generate(CAPTIONS[0], num_samples=2, seed=1, top_k=1)
    assert torch.equal(a, m.generate(CAPTIONS[0], num_samples=2, seed=2, top_k=1))
    assert torch.equal(a[0], a[1])


def test_bad_options_are_errors() -> None:
    m = make()
    with pytest.raises(ValueError, match="allowed: temperature, top_k, guidance"):
        m.generate(CAPTIONS, seed=0, steps=3)
    with pytest.raises(ValueError, match="temperature"):
        m.generate(CAPTIONS, seed=0, temperature=0.0)
    with pytest.raises(ValueError, match="top_k"):
        m.generate(CAPTIONS, seed=0, top_k=0)


def test_condition_dropout_empties_captions_in_training() -> None:
    x = images(3, 1, 8)
    m = make(cond_drop_prob=1.0)
    with torch.no_grad():
        dropped = m.training_step({"image": x, "caption": CAPTIONS}, 0)
        assert torch.equal(dropped, m.loss(x, ["", "", ""]))
    m = make(cond_drop_prob=0.0)
    with torch.no_grad():
        assert torch.equal(m.training_step({"image": x, "caption": CAPTIONS}, 0), m.loss(x, CAPTIONS))


def test_condition_dropout_draws_from_the_global_rng_only_when_on() -> None:
    torch.manual_seed(0)
    assert drop_captions(CAPTIONS, 0.0) == CAPTIONS
    after_off = torch.rand(1)
    torch.manual_seed(0)
    assert drop_captions(CAPTIONS, 0.5) == drop_captions(CAPTIONS, 0.5, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    assert torch.equal(after_off, torch.rand(1))  # p = 0 consumed nothing


# ------------------------------------------------------------------------------------ validation
def test_validation_ignores_padding_rows() -> None:
    m = make()
    batch = {
        "image": images(4, 1, 8),
        "caption": (CAPTIONS * 2)[:4],
        "valid": torch.ones(4, dtype=torch.bool),
    }
    padded = dict(
        batch,
        image=torch.cat([batch["image"], -batch["image"][:2]]),  # repeats of rows 0-1, other pixels
        caption=batch["caption"] + batch["caption"][:2],
        valid=torch.cat([batch["valid"], torch.zeros(2, dtype=torch.bool)]),
    )
    with torch.no_grad():  # the padding rows would move the loss if they were counted
        assert m.loss(padded["image"], padded["caption"]).item() != pytest.approx(
            m.loss(batch["image"], batch["caption"]).item(), rel=1e-3
        )
    trainer = build_trainer(m)
    trainer.validate(m, DataLoader([batch], batch_size=None), verbose=False)
    clean = trainer.callback_metrics["val/loss"].item()
    trainer.validate(m, DataLoader([padded], batch_size=None), verbose=False)
    assert trainer.callback_metrics["val/loss"].item() == pytest.approx(clean, rel=1e-5)
    bits = trainer.callback_metrics["val/bits_per_dim"].item()
    assert bits == pytest.approx(clean / math.log(2), rel=1e-5)
    assert m.validation_step(dict(batch, valid=torch.zeros(4, dtype=torch.bool)), 0) is None


# ------------------------------------------------------------------------- configs and exports
def test_shipped_yaml_builds_a_module() -> None:
    cfg = load_config(ROOT / "models" / "autoregressive.yaml")
    assert isinstance(cfg.model, AutoregressiveConfig)
    m = build_module(cfg, Tokenizer.build(CAPTIONS), cfg.data.image_size, cfg.data.channels)
    assert isinstance(m, AutoregressiveModule)
    assert m.trainer_cfg.max_steps == cfg.trainer.max_steps
    with pytest.raises(ConfigError, match="model.levels"):
        load_config(ROOT / "models" / "autoregressive.yaml", overrides=["model.levels=1"])


def test_export_round_trip_gives_identical_samples(tmp_path: Path) -> None:
    m = make(8, 3)
    with torch.no_grad():
        for p in m.parameters():  # move off the initialisation so a missing weight would show
            p.add_(0.05 * torch.randn_like(p))
    loaded = load_export(export_model(m, tmp_path / "export"))
    assert isinstance(loaded, AutoregressiveModule)
    a = m.generate(CAPTIONS, seed=3, guidance=2.0)
    assert torch.equal(a, loaded.generate(CAPTIONS, seed=3, guidance=2.0))


def test_loss_runs_under_bf16_autocast() -> None:
    m = make(8, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = m.loss(images(2, 3, 8), CAPTIONS[:2])
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()


def test_a_few_steps_on_a_fixed_batch_lower_the_loss() -> None:
    m = make(cond_drop_prob=0.0)
    x = images(8, 1, 8).sign()  # two levels: learnable in a few steps
    caps = (CAPTIONS * 3)[:8]
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    first = m.loss(x, caps).item()
    for _ in range(25):
        loss = m.loss(x, caps)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert m.loss(x, caps).item() < 0.7 * first

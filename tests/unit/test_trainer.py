"""The one Trainer builder (aigc.training.trainer.build_trainer): the rules every caller shares."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from aigc.config import ConfigError, TrainerConfig, load_config
from aigc.models import build_module
from aigc.models.text import Tokenizer
from aigc.training.trainer import build_trainer

ROOT = Path(__file__).resolve().parents[2]


def _module(family: str, *overrides: str):
    cfg = load_config(ROOT / "models" / f"{family}.yaml", list(overrides))
    tokenizer = Tokenizer.build(["a handwritten digit one", "the digit 2"])
    return build_module(cfg, tokenizer, cfg.data.image_size, cfg.data.channels)


def test_automatic_optimisation_takes_clipping_and_accumulation_from_the_config() -> None:
    vae = _module("vae", "trainer.grad_clip=0.5", "trainer.accumulate_grad_batches=3")
    trainer = build_trainer(vae)
    assert trainer.gradient_clip_val == 0.5
    assert trainer.accumulate_grad_batches == 3
    assert trainer.max_steps == vae.trainer_cfg.max_steps


def test_manual_optimisation_gets_no_lightning_clipping_or_accumulation() -> None:
    # The GAN steps its own two optimisers and clips itself; Lightning refuses accumulation then.
    gan = _module("gan", "trainer.grad_clip=0.5", "trainer.accumulate_grad_batches=3")
    assert not gan.automatic_optimization
    trainer = build_trainer(gan)
    assert trainer.gradient_clip_val is None
    assert trainer.accumulate_grad_batches == 1


def test_validation_runs_every_n_optimiser_steps_not_per_epoch() -> None:
    module = _module("diffusion", "trainer.val_every_steps=7", "trainer.limit_val_batches=3")
    trainer = build_trainer(module)
    assert trainer.val_check_interval == 7
    assert trainer.check_val_every_n_epoch is None
    assert trainer.limit_val_batches == 3
    assert trainer.num_sanity_val_steps == 0


def test_an_explicit_config_and_overrides_win() -> None:
    module = _module("vae")
    tc = TrainerConfig(max_steps=11, grad_clip=None)
    trainer = build_trainer(module, tc, limit_val_batches=0)
    assert trainer.max_steps == 11
    assert trainer.gradient_clip_val is None
    assert trainer.limit_val_batches == 0


def test_bf16_is_ignored_with_a_warning_on_cpu() -> None:
    module = _module("vae", "trainer.precision=bf16-mixed")
    with pytest.warns(UserWarning, match="trainer.precision=bf16-mixed ignored on CPU"):
        trainer = build_trainer(module)
    assert trainer.precision == "32-true"


def test_the_quiet_defaults_leave_logging_and_checkpoints_to_aigc() -> None:
    module = _module("vae")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = build_trainer(module)
    assert trainer.logger is None
    assert trainer.checkpoint_callback is None
    assert trainer.progress_bar_callback is None


def test_trainer_monitor_is_no_longer_a_silent_key() -> None:
    # It was read by nothing; under extra="forbid" a key that does nothing is an error now.
    with pytest.raises(ConfigError, match="trainer.monitor"):
        load_config(None, ["trainer.monitor=val/loss"])

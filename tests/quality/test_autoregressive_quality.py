"""The autoregressive family learns the digits: trained on the shards for the step count of
models/autoregressive.yaml (calibrated over 3 seeds, see models/autoregressive.md), its samples
for the held-out caption template are classified as the digit asked for, with FD far below an
untrained model's and no collapse or copying."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from aigc.config import load_config
from aigc.data.captions_io import read_captions
from aigc.data.loader import ShardDataModule
from aigc.evaluation import evaluate_model
from aigc.models import build_module
from aigc.models.text import Tokenizer

ROOT = Path(__file__).resolve().parents[2]
SEED = int(os.environ.get("AIGC_QUALITY_SEED", "0"))  # the calibration reran this test for 0, 1, 2


def trainer(**kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=False,
        **kwargs,
    )


@pytest.fixture
def one_thread():
    """One torch thread: on a shared 2-core machine two threads spin against other jobs and a step
    slows down up to tenfold; one thread keeps the test's time predictable (see the model card)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_autoregressive_learns_digits(digits_dataset: Path, reference_evaluator, one_thread) -> None:
    cfg = load_config(ROOT / "models" / "autoregressive.yaml", ["data.num_workers=0", f"trainer.seed={SEED}"])
    tokenizer = Tokenizer.build(read_captions(digits_dataset, "train"))
    size, channels = cfg.data.image_size, cfg.data.channels
    pl.seed_everything(SEED)
    untrained = build_module(cfg, tokenizer, size, channels)
    pl.seed_everything(SEED)
    module = build_module(cfg, tokenizer, size, channels)
    data = ShardDataModule(cfg.data, location=digits_dataset, seed=SEED)

    val_before = trainer().validate(untrained, datamodule=data, verbose=False)[0]["val/loss"]
    fit = trainer(
        max_steps=cfg.trainer.max_steps,
        gradient_clip_val=cfg.trainer.grad_clip,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    fit.fit(module, datamodule=data)
    assert fit.global_step == cfg.trainer.max_steps
    assert math.isfinite(float(fit.callback_metrics["train/loss"]))
    val_after = trainer().validate(module, datamodule=data, verbose=False)[0]["val/loss"]
    # Uniform over 16 levels is ln 16 = 2.77 nats per token; the untrained net is about there.
    assert val_after < val_before - 1.0, (val_before, val_after)

    base = evaluate_model(untrained, reference_evaluator, digits_dataset, num_samples=500, seed=0)
    result = evaluate_model(module, reference_evaluator, digits_dataset, num_samples=500, seed=0)
    figures = {k: v for k, v in result.items() if k.startswith("eval/")}
    print(
        json.dumps(
            {
                "seed": SEED,
                "steps": fit.global_step,
                "val_loss": val_after,
                "untrained_fd": base["eval/fd"],
                **figures,
            },
            indent=1,
        )
    )
    assert result["prompts"] == "heldout"
    assert result["eval/cond_accuracy"] >= 0.80, result
    assert result["eval/fd"] < 0.3 * base["eval/fd"], (result["eval/fd"], base["eval/fd"])
    assert not result["collapse"] and not result["copying"], result
    # Same seed, same images: the sampling is reproducible end to end.
    prompt = ["a drawing of the handwritten number four"]
    first = module.generate(prompt, num_samples=4, seed=1)
    assert torch.equal(first, module.generate(prompt, num_samples=4, seed=1))

"""Diffusion quality (issue 3): models/diffusion.yaml trained on the digits shards meets its targets.

Trains the shipped config as it is, for its ``trainer.max_steps`` steps on one CPU process (the
calibration over seeds is in models/diffusion.md), then measures 500 samples generated from the
held-out caption template with the reference evaluator, using the config's sampling defaults
(DDIM, ``sample_steps``, ``guidance``). ``AIGC_QUALITY_SEED`` replaces ``trainer.seed`` (calibration).

Torch runs ``trainer.threads_per_worker`` threads (1 in the shipped config): on a busy 2-core machine
two OpenMP threads ran a training step 10-20x slower than one.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch

from aigc.config import RunConfig, load_config
from aigc.data.captions_io import read_captions
from aigc.data.loader import ShardDataModule
from aigc.evaluation import evaluate_model
from aigc.models import build_module
from aigc.models.text import Tokenizer

ROOT = Path(__file__).resolve().parents[2]
MIN_ACCURACY = 0.95
FD_RATIO = 0.2  # trained FD must be below a fifth of the untrained model's


def _train_and_evaluate(cfg: RunConfig, dataset: Path, evaluator) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train ``cfg`` as the quality test does; the evaluation result and a printable summary."""
    tokenizer = Tokenizer.build(read_captions(dataset, "train"))
    pl.seed_everything(cfg.trainer.seed, verbose=False)
    module = build_module(cfg, tokenizer, cfg.data.image_size, cfg.data.channels)
    untrained = evaluate_model(module, evaluator, dataset, num_samples=500, seed=0)
    data = ShardDataModule(cfg.data, location=dataset, seed=cfg.trainer.seed)

    trainer = pl.Trainer(
        max_steps=cfg.trainer.max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=False,
        limit_val_batches=0,
        gradient_clip_val=cfg.trainer.grad_clip,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    train_seconds = time.perf_counter() - start
    assert trainer.global_step == cfg.trainer.max_steps

    # val/loss of the EMA model on fixed noise, against an untrained model's.
    fresh = build_module(cfg, tokenizer, cfg.data.image_size, cfg.data.channels)
    val = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=cfg.trainer.limit_val_batches,
    )
    val_loss = val.validate(module, datamodule=data, verbose=False)[0]["val/loss"]
    val_loss_untrained = val.validate(fresh, datamodule=data, verbose=False)[0]["val/loss"]

    result = evaluate_model(module, evaluator, dataset, num_samples=500, seed=0)
    keys = ("eval/cond_accuracy", "eval/fd", "eval/diversity", "eval/copy_fraction", "sampling_seconds")
    summary = {k: result[k] for k in keys}
    summary.update(
        {
            "seed": cfg.trainer.seed,
            "steps": cfg.trainer.max_steps,
            "threads": torch.get_num_threads(),
            "train_seconds": round(train_seconds, 1),
            "untrained_fd": untrained["eval/fd"],
            "val_loss": val_loss,
            "val_loss_untrained": val_loss_untrained,
        }
    )
    return result, summary


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_diffusion_follows_heldout_captions(digits_dataset: Path, reference_evaluator) -> None:
    seed = os.environ.get("AIGC_QUALITY_SEED")
    cfg = load_config(ROOT / "models" / "diffusion.yaml", overrides=[f"trainer.seed={seed}"] if seed else [])
    previous = torch.get_num_threads()
    torch.set_num_threads(cfg.trainer.threads_per_worker or previous)
    try:
        result, summary = _train_and_evaluate(cfg, digits_dataset, reference_evaluator)
    finally:
        torch.set_num_threads(previous)
    print(json.dumps(summary))
    assert result["prompts"] == "heldout"
    assert result["eval/cond_accuracy"] >= MIN_ACCURACY, summary
    assert result["eval/fd"] < FD_RATIO * summary["untrained_fd"], summary
    assert summary["val_loss"] < 0.5 * summary["val_loss_untrained"], summary
    assert not result["collapse"], summary
    assert not result["copying"], summary

"""The one place a Lightning ``Trainer`` is built from a run's ``trainer`` config.

``aigc train``'s workers, the quality tests, the benchmarks and the unit tests all call
:func:`build_trainer`, so what is tested is what trains. The rules that live here:

- ``max_steps``, validation every ``val_every_steps`` optimiser steps (not per epoch: the shard
  loader's epochs are an implementation detail), ``limit_val_batches``, no sanity validation;
- precision through :func:`aigc.config.lightning_precision` (bf16/fp16 on GPU only);
- a module with manual optimisation (the GAN steps its own two optimisers and clips with
  ``trainer.grad_clip`` itself) gets no Lightning clipping and no gradient accumulation, which
  Lightning refuses for manual optimisation;
- quiet: logging goes to MLflow through aigc's own callbacks, checkpoints through
  ``StepCheckpoint``, so Lightning's logger, checkpointing, progress bar and summary are off;
- ``distributed=True`` (inside a Ray Train worker): Ray's DDP strategy and cluster environment,
  every device Ray gave the worker, no distributed sampler (the shard loader splits by rank
  itself), and ``prepare_trainer`` applied.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl

from aigc.config import TrainerConfig, lightning_precision


def build_trainer(
    module: pl.LightningModule,
    trainer_cfg: TrainerConfig | None = None,
    *,
    use_gpu: bool = False,
    distributed: bool = False,
    callbacks: Sequence[pl.Callback] = (),
    **overrides: Any,
) -> pl.Trainer:
    """A ``pl.Trainer`` for ``module`` under ``trainer_cfg`` (default: the module's ``trainer_cfg``).

    ``overrides`` are passed to ``pl.Trainer`` last, for what a test or benchmark changes on
    purpose (``limit_val_batches=0``, ``max_time=...``, ``default_root_dir=...``).
    """
    tc = trainer_cfg if trainer_cfg is not None else module.trainer_cfg
    manual = not module.automatic_optimization
    kwargs: dict[str, Any] = dict(
        max_steps=tc.max_steps,
        accelerator="gpu" if use_gpu else "cpu",
        devices=1,
        precision=lightning_precision(tc.precision, use_gpu),
        gradient_clip_val=None if manual else tc.grad_clip,
        accumulate_grad_batches=1 if manual else tc.accumulate_grad_batches,
        val_check_interval=tc.val_every_steps,
        check_val_every_n_epoch=None,
        limit_val_batches=tc.limit_val_batches,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
    )
    if distributed:
        from ray.train.lightning import RayDDPStrategy, RayLightningEnvironment

        kwargs.update(
            devices="auto",
            strategy=RayDDPStrategy(),
            plugins=[RayLightningEnvironment()],
            use_distributed_sampler=False,
        )
    kwargs.update(overrides)
    trainer = pl.Trainer(**kwargs)
    if distributed:
        from ray.train.lightning import prepare_trainer

        trainer = prepare_trainer(trainer)
    return trainer

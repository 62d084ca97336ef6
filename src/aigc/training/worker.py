"""The per-worker training loop that Ray Train runs on every rank.

Everything arrives in ``config`` as plain JSON (resolved by the driver: absolute paths, the MLflow
URI and run id, the tokenizer), because workers run in Ray's session folder on possibly other
machines. Distributed concerns stay here: rank-zero logging, the Ray strategy and environment,
resuming from ``ray.train.get_checkpoint()``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("aigc.training")

# Fault injection for tests of fault tolerance: the named rank exits hard at the named step on the
# first attempt only (a marker file under the run folder remembers the attempt).
FAULT_ENV = "AIGC_FAULT_EXIT_AT_STEP"  # "<rank>:<step>"
# Tests of data parallelism and placement: each rank appends the sample keys it trained on and its
# Ray node id to files in this folder.
RECORD_ENV = "AIGC_RECORD_KEYS_DIR"


class _FaultInjection:
    """Exit the process (as a crashed worker would) at a given step, once per run."""

    def __init__(self, spec: str, marker: Path):
        rank, step = spec.split(":")
        self.rank, self.step, self.marker = int(rank), int(step), marker

    def callback(self):
        import pytorch_lightning as pl

        outer = self

        class _Exit(pl.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                hit = trainer.global_rank == outer.rank and trainer.global_step == outer.step
                if hit and not outer.marker.exists():
                    outer.marker.write_text(str(outer.step))
                    # Ray needs every rank's report of the last checkpoint before a crash, and polls
                    # workers every 2 s (STACK-NOTES): die well after it, as a real crash would.
                    time.sleep(3.0)
                    log.warning("fault injection: rank %d exits at step %d", outer.rank, outer.step)
                    os._exit(17)

        return _Exit()


def _data_position(ckpt_file: Path) -> tuple[int, int]:
    """(epoch, batches of that epoch already trained on) from a Lightning checkpoint's loop state."""
    import torch

    ckpt = torch.load(ckpt_file, map_location="cpu", weights_only=True, mmap=True)
    progress = ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]
    return int(ckpt["epoch"]), int(progress["processed"])


def _key_recorder(folder: str):
    import pytorch_lightning as pl
    import ray

    class _Record(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            path = Path(folder) / f"node-rank{trainer.global_rank}.txt"
            path.write_text(ray.get_runtime_context().get_node_id())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            with open(Path(folder) / f"keys-rank{trainer.global_rank}.txt", "a") as f:
                f.write("".join(f"{trainer.global_step} {k}\n" for k in batch["key"]))

    return _Record()


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train entry point: build data and model from ``config``, fit with the Ray DDP strategy."""
    import pytorch_lightning as pl
    import ray.train
    import torch
    from ray.train.lightning import RayDDPStrategy, RayLightningEnvironment, prepare_trainer

    from aigc.config import RunConfig, lightning_precision
    from aigc.data.loader import ShardDataModule
    from aigc.models import build_module
    from aigc.models.text import Tokenizer
    from aigc.tracking import RunLogger
    from aigc.training.callbacks import (
        CHECKPOINT_NAME,
        MlflowMetrics,
        RngState,
        StartupTimer,
        StepCheckpoint,
    )

    # Lightning logs "weights_only was not set" at INFO on every checkpoint *save*; it is not a load.
    logging.getLogger("pytorch_lightning.trainer.connectors.checkpoint_connector").setLevel(logging.WARNING)
    worker_t0 = time.time()
    cfg = RunConfig.model_validate(config["run"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    tc, sc = cfg.trainer, cfg.scaling

    threads = tc.threads_per_worker or max(1, int(sc.cpus_per_worker))
    torch.set_num_threads(threads)
    # Same seed on every rank for the initial weights (DDP also broadcasts rank 0's), then a
    # per-rank stream for noise and dropout.
    pl.seed_everything(tc.seed, workers=True, verbose=False)
    tokenizer = Tokenizer.from_dict(config["tokenizer"])
    module = build_module(cfg, tokenizer, config["image_size"], config["channels"])
    torch.manual_seed(tc.seed + 1000 * rank)

    datamodule = ShardDataModule(cfg.data, location=config["data_location"], seed=tc.seed)
    logger = RunLogger.for_rank(
        rank, config["tracking_uri"], config["run_id"], system_metrics=cfg.tracking.system_metrics
    )

    callbacks: list[pl.Callback] = [
        StepCheckpoint(tc.checkpoint_every_steps),
        RngState(),
        StartupTimer(logger, config.get("driver_t0", worker_t0), worker_t0),
        MlflowMetrics(
            logger,
            log_every=tc.log_every_steps,
            sample_every=tc.sample_every_steps,
            samples_per_sample_grid=config.get("grid_samples", 8),
            prompts=config["sample_prompts"],
            samples_per_rank_step=cfg.data.batch_size * tc.accumulate_grad_batches,
            world_size=world,
        ),
    ]
    fault = os.environ.get(FAULT_ENV)
    if fault:
        callbacks.append(_FaultInjection(fault, Path(config["run_dir"]) / ".fault-injected").callback())
    if os.environ.get(RECORD_ENV):
        callbacks.append(_key_recorder(os.environ[RECORD_ENV]))

    manual = not module.automatic_optimization  # the GAN steps its own two optimisers
    trainer = pl.Trainer(
        max_steps=tc.max_steps,
        accelerator="gpu" if sc.use_gpu else "cpu",
        devices="auto",
        strategy=RayDDPStrategy(),
        plugins=[RayLightningEnvironment()],
        precision=lightning_precision(tc.precision, sc.use_gpu),
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
        use_distributed_sampler=False,
        callbacks=callbacks,
    )
    trainer = prepare_trainer(trainer)

    try:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                step = json.loads((Path(d) / "aigc-step.json").read_text())["global_step"]
                log.info("rank %d resumes from %s (step %d)", rank, checkpoint.path, step)
                # Recorded in the run so a resume is visible in the UI (and testable).
                logger.log_metrics({"train/resumed_from_step": float(step)}, step=step)
                ckpt_file = Path(d) / CHECKPOINT_NAME
                datamodule.resume_at(*_data_position(ckpt_file))
                # weights_only=True: plain tensors and JSON types only, never arbitrary pickles.
                trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt_file), weights_only=True)
        else:
            trainer.fit(module, datamodule=datamodule)
    finally:
        logger.close()

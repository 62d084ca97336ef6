"""The per-worker training loop that Ray Train runs on every rank.

Everything arrives in ``config`` as the job's :class:`~aigc.training.job.TrainJob` in plain JSON
(resolved by the driver: absolute paths, the MLflow URI and run id, the tokenizer), because
workers run in Ray's session folder on possibly other machines. Distributed concerns stay here:
rank-zero logging, the Ray strategy (through ``build_trainer(distributed=True)``), resuming from
``ray.train.get_checkpoint()`` (or, on an ``aigc train --resume`` Ray has no checkpoint for, from
the run folder's newest complete checkpoint: :func:`_stored_checkpoint`), and (in its callbacks)
checkpoint reports and the skipped-sample counts summed over ranks.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from aigc.contract import FINAL_GRID, STEP_FILE

log = logging.getLogger("aigc.training")

# Fault injection for tests of fault tolerance: the named rank exits hard at the named step on the
# first attempt only (a marker file under the run folder remembers the attempt).
FAULT_ENV = "AIGC_FAULT_EXIT_AT_STEP"  # "<rank>:<step>"
# Tests of data parallelism, placement and elastic resizes: each rank appends the sample keys it
# trained on ("<step> <key> <epoch> <step the attempt started at>", valid samples only) and its Ray
# node id to files in this folder, and rank 0 appends "<step> <world size>" to attempts.txt each time
# training (re)starts.
RECORD_ENV = "AIGC_RECORD_KEYS_DIR"
# Tests that must act while a job is still training (kill a node, let it rejoin): sleep this many
# seconds after every step, so the job outlasts what the test does on a fast machine, until the test
# writes STEP_SLEEP_RELEASE into the AIGC_RECORD_KEYS_DIR folder (it has seen what it waited for).
STEP_SLEEP_ENV = "AIGC_STEP_SLEEP_S"
STEP_SLEEP_RELEASE = "release"


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
                    # Ray needs every rank's report of the last checkpoint before a crash and polls
                    # workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s): a checkpoint reported
                    # less than ~2 s before a crash can be lost. Die well after it, as a real crash
                    # of a long step would.
                    time.sleep(3.0)
                    log.warning("fault injection: rank %d exits at step %d", outer.rank, outer.step)
                    os._exit(17)

        return _Exit()


def _key_recorder(folder: str):
    import pytorch_lightning as pl
    import ray

    class _Record(pl.Callback):
        start = 0

        def on_train_start(self, trainer, pl_module):
            self.start = trainer.global_step
            path = Path(folder) / f"node-rank{trainer.global_rank}.txt"
            path.write_text(ray.get_runtime_context().get_node_id())
            if trainer.global_rank == 0:
                with open(Path(folder) / "attempts.txt", "a") as f:
                    f.write(f"{trainer.global_step} {trainer.world_size}\n")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            epoch = trainer.current_epoch
            keys = [k for k, v in zip(batch["key"], batch["valid"].tolist(), strict=True) if v]
            with open(Path(folder) / f"keys-rank{trainer.global_rank}.txt", "a") as f:
                f.write("".join(f"{trainer.global_step} {k} {epoch} {self.start}\n" for k in keys))
            if os.environ.get(STEP_SLEEP_ENV) and not (Path(folder) / STEP_SLEEP_RELEASE).exists():
                time.sleep(float(os.environ[STEP_SLEEP_ENV]))

    return _Record()


def _stored_checkpoint(run_dir: str):
    """The newest complete ``checkpoint-step*`` folder of the run (:func:`~aigc.training.job.
    complete_checkpoints`) as a ``ray.train.Checkpoint`` on Ray's storage filesystem, or None.

    For a resumed run Ray hands no checkpoint: Ray Train 2.60 restores from its
    ``checkpoint_manager_snapshot.json`` only, and the controller does not retry writing it, so a
    storage outage during its first write fails the job with no snapshot at all although complete
    checkpoints are in the run folder (``tests/integration/test_outage_s3.py``, ``no-route``). Every
    rank lists the same folder after the previous job ended, so every rank picks the same one."""
    import ray.train

    from aigc.training.job import complete_checkpoints

    complete = complete_checkpoints(run_dir)
    if not complete:
        print(
            f"aigc: resuming {run_dir}: neither Ray Train nor the run folder has a complete checkpoint",
            flush=True,
        )
        return None
    name = complete[-1].rsplit("/", 1)[-1]
    print(
        f"aigc: resuming {run_dir}: Ray Train has no checkpoint of it (its checkpoint_manager_snapshot"
        f".json lists none: the run may have failed before Ray wrote it); resuming from {name}, the "
        "newest complete checkpoint folder",
        flush=True,
    )
    storage = ray.train.get_context().get_storage()
    return ray.train.Checkpoint(storage.build_checkpoint_path_from_name(name), storage.storage_filesystem)


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train entry point: ``config`` is a :class:`~aigc.training.job.TrainJob` as JSON; build data
    and model from it and fit with the Ray DDP strategy (see :func:`build_trainer`)."""
    import pytorch_lightning as pl
    import ray.train
    import torch

    from aigc.data.loader import ShardDataModule
    from aigc.models import build_module
    from aigc.models.text import Tokenizer
    from aigc.tracking import RunLogger
    from aigc.training.callbacks import (
        CHECKPOINT_NAME,
        BadSampleReport,
        MlflowMetrics,
        RngState,
        SeenSamples,
        StartupTimer,
        StepCheckpoint,
        resume_plan,
    )
    from aigc.training.job import TrainJob
    from aigc.training.trainer import build_trainer
    from aigc.training.validation import worst_value

    # Lightning logs "weights_only was not set" at INFO on every checkpoint *save*; it is not a load.
    logging.getLogger("pytorch_lightning.trainer.connectors.checkpoint_connector").setLevel(logging.WARNING)
    worker_t0 = time.time()
    job = TrainJob.from_json(config)
    cfg = job.run
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    tc, sc = cfg.trainer, cfg.scaling

    threads = tc.threads_per_worker or max(1, int(sc.cpus_per_worker))
    torch.set_num_threads(threads)
    # Same seed on every rank for the initial weights (DDP also broadcasts rank 0's), then a
    # per-rank stream for noise and dropout.
    pl.seed_everything(tc.seed, workers=True, verbose=False)
    module = build_module(cfg, Tokenizer.from_dict(job.tokenizer), job.image_size, job.channels, job.latent)
    if job.init_from is not None:  # fine-tuning: the source's weights (a checkpoint, if any, replaces them)
        from aigc.models.init import load_init

        load_init(module, job.init_from)
    if module.carries_autoencoder:  # the frozen autoencoder a latent model decodes with, from its dataset
        from aigc.models.export import load_dataset_autoencoder

        module.load_autoencoder(load_dataset_autoencoder(job.data_location))
    torch.manual_seed(tc.seed + 1000 * rank)

    datamodule = ShardDataModule(cfg.data, location=job.data_location, seed=tc.seed)
    logger = RunLogger.for_rank(
        rank, job.tracking_uri, job.run_id, system_metrics=cfg.tracking.system_metrics
    )

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and job.resumed:
        checkpoint = _stored_checkpoint(job.run_dir)
    # The checkpoint's folder is opened once (from S3 it is a download) and kept for fit().
    with checkpoint.as_directory() if checkpoint is not None else contextlib.nullcontext() as ckpt_dir:
        ckpt_file = Path(ckpt_dir) / CHECKPOINT_NAME if ckpt_dir is not None else None
        resume = None
        if ckpt_file is not None:
            # weights_only=True: plain tensors and JSON types only, never arbitrary pickles.
            state = torch.load(ckpt_file, map_location="cpu", weights_only=True, mmap=True)
            resume = resume_plan(state, world)
            del state
        callbacks: list[pl.Callback] = [
            # First: it marks a batch's samples before StepCheckpoint may save after that batch.
            (resume and resume[3]) or SeenSamples(datamodule.num_samples("train")),
            StepCheckpoint(
                tc.checkpoint_every_steps,
                eval_every=tc.eval_every_steps,
                placeholder={tc.checkpoint_metric: worst_value(tc.checkpoint_mode)}
                if tc.eval_every_steps
                else None,
            ),
            RngState(),
            StartupTimer(logger, job.launched_at or worker_t0, worker_t0),
            MlflowMetrics(
                logger,
                log_every=tc.log_every_steps,
                sample_every=tc.sample_every_steps,
                prompts=job.sample_prompts,
                samples_per_rank_step=cfg.data.batch_size * tc.accumulate_grad_batches,
                world_size=world,
                final_grid=f"{job.run_dir}/{FINAL_GRID}",
            ),
            BadSampleReport(datamodule, logger),
        ]
        fault = os.environ.get(FAULT_ENV)
        if fault:
            callbacks.append(_FaultInjection(fault, Path(job.run_dir) / ".fault-injected").callback())
        if os.environ.get(RECORD_ENV):
            callbacks.append(_key_recorder(os.environ[RECORD_ENV]))

        trainer = build_trainer(module, use_gpu=sc.use_gpu, distributed=True, callbacks=callbacks)
        try:
            if resume is None:
                trainer.fit(module, datamodule=datamodule)
                return
            step = json.loads((Path(ckpt_dir) / STEP_FILE).read_text())["global_step"]
            epoch, done, unseen_from, _ = resume
            log.info(
                "rank %d of %d resumes from %s (step %d, epoch %d after %d batches%s)",
                rank,
                world,
                checkpoint.path,
                step,
                epoch,
                done,
                "; the rest of the epoch re-planned for this world size" if unseen_from is not None else "",
            )
            # Recorded in the run so a resume (and an elastic resize) is visible in the UI.
            logger.log_metrics(
                {"train/resumed_from_step": float(step), "train/world_size": float(world)}, step=step
            )
            datamodule.resume_at(epoch, done, unseen_from)
            trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt_file), weights_only=True)
        finally:
            logger.close()

"""Lightning callbacks used inside Ray Train workers.

- :class:`StepCheckpoint`: a Lightning checkpoint every N optimiser steps and at the end, written
  by rank 0 and reported to Ray Train by every rank (``ray.train.report`` is a barrier: all ranks
  must call it the same number of times). Ray's own ``RayTrainReportCallback`` saves at epoch end
  only and has every rank upload the same file (ray 2.60). Rank 0's upload is
  :func:`upload_checkpoint`: Ray's copy, then every file checked in storage, retried, else an error.
- :class:`MlflowMetrics`: rank-0 metrics (``train/*``, ``val/*``, ``perf/samples_per_s``, ``lr``) and
  sample grids, sent through the non-blocking :class:`aigc.tracking.RunLogger`; the final grid is
  also written beside the checkpoints and logged as the run's ``samples-final.png`` artifact.
- :class:`BadSampleReport`: the train samples the loader skipped, summed over ranks at each epoch's
  end (an all-reduce) and logged by rank 0 (``data/bad_samples``, ``data/bad_fraction``, the
  ``aigc.data.bad_shards`` tag): below ``data.max_bad_fraction`` the loader only warns in the
  worker logs, which nobody reads.
- :class:`RngState`: saves each rank's RNG state in the checkpoint so a resumed run continues the
  same random stream (the rank-0 state is what the checkpoint holds; see ``training/README``).
- :class:`SeenSamples`: the train samples this epoch has trained on, over all ranks, in every
  checkpoint, so an elastic job resumed at another world size trains on the rest of the epoch only.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from aigc.contract import CHECKPOINT_NAME, STEP_FILE, checkpoint_dir_name


def _scalar_metrics(trainer: pl.Trainer, prefix: tuple[str, ...]) -> dict[str, float]:
    out = {}
    for k, v in trainer.callback_metrics.items():
        if k.startswith(prefix):
            value = float(v.detach().float().cpu()) if torch.is_tensor(v) else float(v)
            if math.isfinite(value):
                out[k] = value
    return out


#: How often :func:`upload_checkpoint` tries again, and its first wait (doubled each time): the waits
#: add up to 63 s, longer than the storage outages a job should ride out.
UPLOAD_RETRIES = 6
UPLOAD_BACKOFF_S = 1.0


class CheckpointUploadError(RuntimeError):
    """A checkpoint could not be written complete to the storage path: the job fails with this
    rather than have Ray register a checkpoint that a resume could not load."""


def upload_checkpoint(
    checkpoint,
    checkpoint_dir_name: str,
    *,
    storage=None,
    retries: int = UPLOAD_RETRIES,
    backoff_s: float = UPLOAD_BACKOFF_S,
):
    """Ray Train's ``checkpoint_upload_fn`` (ray 2.60 calls it with the local checkpoint and the
    folder name): persist the local ``checkpoint`` folder as Ray's default would, then check that
    every one of its files is in storage with the same size; on an error or a difference wait
    (``backoff_s``, doubled each time) and try again, ``retries`` times, then raise
    :class:`CheckpointUploadError`. Returns the persisted ``ray.train.Checkpoint`` for Ray to register.

    Why Ray's upload alone is not enough: pyarrow's S3 output stream ignores a failed part upload
    when it is closed ("Error ignored when destroying file of type ObjectOutputStream"), so
    ``pyarrow.fs.copy_files`` returns, Ray logs "Checkpoint successfully created" and registers a
    folder without its files (S3 cut off mid-upload, ``tests/integration/test_outage_s3.py``).

    ``storage`` is Ray's ``StorageContext`` (``ray.train.get_context().get_storage()`` when None):
    the copy is its ``persist_current_checkpoint``, so the checkpoint lands where, and on the
    filesystem object, Ray expects it. The final error names the checkpoint, the destination and
    what was wrong; the storage error itself is its ``__cause__``, not in its message: Ray retries
    an upload whose error message reads like a transient AWS error (``AWS_RETRYABLE_TOKENS``, 3
    attempts), which would run these retries three times over.
    """
    import pyarrow.fs

    if storage is None:
        import ray.train

        storage = ray.train.get_context().get_storage()
    fs, dest = storage.storage_filesystem, storage.build_checkpoint_path_from_name(checkpoint_dir_name)
    where = f"{fs.type_name}://{dest}" if fs.type_name in ("s3", "gcs", "abfs", "hdfs") else dest
    source = checkpoint.path.rstrip("/")
    local = checkpoint.filesystem.get_file_info(pyarrow.fs.FileSelector(source, recursive=True))
    # Relative name -> size of every file the checkpoint holds (aigc's: STEP_FILE and CHECKPOINT_NAME).
    expected = {i.path[len(source) + 1 :]: i.size for i in local if i.type == pyarrow.fs.FileType.File}
    names, problem = sorted(expected), ""
    for attempt in range(retries + 1):
        if attempt:
            wait = backoff_s * 2 ** (attempt - 1)
            print(
                f"aigc: checkpoint {checkpoint_dir_name} not written complete to {where}: {problem}; "
                f"retry {attempt} of {retries} in {wait:g} s",
                flush=True,
            )
            time.sleep(wait)
        error = None
        try:
            persisted = storage.persist_current_checkpoint(checkpoint, checkpoint_dir_name)
            stored = fs.get_file_info([f"{dest}/{name}" for name in names])
        except Exception as err:  # noqa: BLE001 - any storage error is retried, then raised below
            error, problem = err, f"{type(err).__name__}: {err}"
            continue
        wrong = [
            f"{name} is {'missing' if info.type != pyarrow.fs.FileType.File else f'{info.size} bytes'}, "
            f"not {expected[name]} bytes"
            for name, info in zip(names, stored, strict=True)
            if info.type != pyarrow.fs.FileType.File or info.size != expected[name]
        ]
        if not wrong:
            return persisted
        problem = "; ".join(wrong)
    last = f"the last try raised {type(error).__name__} (the cause below)" if error else problem
    raise CheckpointUploadError(
        f"checkpoint {checkpoint_dir_name} could not be written complete to the storage path {where} "
        f"in {retries + 1} tries ({last}); the job stops rather than register a checkpoint that a "
        "resume could not load"
    ) from error


#: A checkpoint is staged in ``<tmp>/aigc-ckpt-<pid>-rank<r>-XXXX`` before Ray copies it to storage.
STAGING_PREFIX = "aigc-ckpt-"


def sweep_checkpoint_staging(tmp_dir: str | None = None) -> list[Path]:
    """Remove the staging folders of processes that no longer run, and return them.

    A worker killed while it reports (a fault, a preempted node, ``SIGKILL``) never reaches the
    ``finally`` that removes its folder: each leaked a full checkpoint into /tmp. The folder's name
    carries its process id; a folder whose process still runs is never touched (a reused id only
    keeps a stale folder until that process ends)."""
    import psutil  # installed with ray

    removed = []
    for path in Path(tmp_dir or tempfile.gettempdir()).glob(f"{STAGING_PREFIX}*-rank*-*"):
        pid = path.name.removeprefix(STAGING_PREFIX).split("-", 1)[0]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


class StepCheckpoint(pl.Callback):
    """Save and report a checkpoint every ``every_n_steps`` optimiser steps and when training ends.

    With ``eval_every`` (``trainer.eval_every_steps``) a checkpoint is also saved every ``eval_every``
    steps, and those and the last are reported with ``validation=True``: Ray Train's controller runs
    the job's ``ValidationConfig`` (:func:`aigc.training.validation.evaluate_checkpoint`) on each in a
    Ray task of its own while the workers train on. Every report then carries ``placeholder``
    (``{checkpoint_metric: its worst value}``): Ray ranks checkpoints by that metric, and one
    without it counts as the *best* under ``mode="min"`` (ray 2.60 scores a missing attribute
    ``-inf``, negated for "min"), so a checkpoint that is never evaluated would never be deleted.
    The evaluation's figures replace the placeholder when they arrive."""

    def __init__(
        self, every_n_steps: int, eval_every: int | None = None, placeholder: dict[str, float] | None = None
    ):
        self.every_n_steps = every_n_steps
        self.eval_every = eval_every
        self.placeholder = dict(placeholder or {})
        self._last_saved_step = -1

    def _due(self, step: int, every: int | None) -> bool:
        return bool(every) and step > 0 and step % every == 0

    def _save_and_report(self, trainer: pl.Trainer, evaluate: bool) -> None:
        import ray.train

        step = trainer.global_step
        if step == self._last_saved_step:
            return
        self._last_saved_step = step
        metrics: dict[str, Any] = _scalar_metrics(trainer, ("train/", "val/"))
        metrics.update(self.placeholder)
        metrics.update(step=step, epoch=trainer.current_epoch)
        sweep_checkpoint_staging()
        tmp = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-rank{trainer.global_rank}-"))
        try:
            # Every rank calls save_checkpoint (it holds a barrier); only global rank 0 writes.
            trainer.save_checkpoint(tmp / CHECKPOINT_NAME)
            checkpoint = None
            if trainer.global_rank == 0:
                (tmp / STEP_FILE).write_text(json.dumps({"global_step": step}))
                checkpoint = ray.train.Checkpoint.from_directory(str(tmp))
            ray.train.report(
                metrics,
                checkpoint=checkpoint,
                checkpoint_dir_name=checkpoint_dir_name(step),
                checkpoint_upload_fn=upload_checkpoint,
                # Ray raises on validation without a checkpoint: only rank 0 holds one.
                validation=evaluate and checkpoint is not None,
            )
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        evaluate = self._due(step, self.eval_every)
        if evaluate or self._due(step, self.every_n_steps):
            self._save_and_report(trainer, evaluate)

    def on_train_end(self, trainer, pl_module) -> None:
        self._save_and_report(trainer, evaluate=bool(self.eval_every))


class RngState(pl.Callback):
    """Carry Python, NumPy and torch RNG state through checkpoints (rank 0's, restored on every rank
    offset by rank so ranks still draw different noise)."""

    def state_dict(self) -> dict[str, Any]:
        # Plain types and tensors only: Lightning resumes with weights_only=True.
        np_state = np.random.get_state()
        return {
            "torch": torch.get_rng_state(),
            "numpy": [
                np_state[0],
                torch.from_numpy(np_state[1].astype(np.int64)),
                *map(int, np_state[2:4]),
                float(np_state[4]),
            ],
            "python": json.dumps(random.getstate()),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        py = json.loads(state["python"])
        random.setstate((py[0], tuple(py[1]), py[2]))
        rank = int(os.environ.get("RANK", "0"))
        if rank:
            # Different ranks must not draw identical noise after a resume.
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,)).item()) + rank)


class MlflowMetrics(pl.Callback):
    """Rank-0 logging to the job's MLflow run; never blocks on the network (RunLogger queues)."""

    #: images per prompt in every sample grid (one row per prompt)
    SAMPLES_PER_PROMPT = 8

    def __init__(
        self,
        logger,
        log_every: int,
        sample_every: int,
        prompts: list[str],
        samples_per_rank_step: int,
        world_size: int,
        final_grid: str | None = None,
    ):
        self.logger = logger
        self.log_every = log_every
        self.sample_every = sample_every
        self.prompts = prompts
        self.samples_per_step = samples_per_rank_step * world_size
        self.final_grid = final_grid  # local path or fsspec URL of the final grid's PNG
        self._t0: float | None = None
        self._step0 = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self._t0 = time.perf_counter()
        self._step0 = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if trainer.global_rank != 0 or step == 0:
            return
        if step % self.log_every == 0:
            metrics = _scalar_metrics(trainer, ("train/",))
            elapsed = time.perf_counter() - (self._t0 or time.perf_counter())
            if elapsed > 0 and step > self._step0:
                metrics["perf/samples_per_s"] = (step - self._step0) * self.samples_per_step / elapsed
            opts = trainer.optimizers
            if opts:
                metrics["train/lr"] = float(opts[0].param_groups[0]["lr"])
            self.logger.log_metrics(metrics, step=step)
        if step % self.sample_every == 0:
            self.log_samples(trainer, pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.global_rank == 0 and not trainer.sanity_checking:
            self.logger.log_metrics(_scalar_metrics(trainer, ("val/",)), step=trainer.global_step)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_rank == 0:
            grid = self.log_samples(trainer, pl_module)
            if self.final_grid:
                self._save_final(grid)
            self.logger.flush()

    def log_samples(self, trainer: pl.Trainer, pl_module):
        """Generate the grid (one row per prompt, seed 0), log it at this step and return it."""
        from aigc.training.grid import image_grid

        n = self.SAMPLES_PER_PROMPT
        grid = image_grid(pl_module.generate(self.prompts, num_samples=n, seed=0), nrow=n)
        self.logger.log_image(grid, key="samples", step=trainer.global_step)
        return grid

    def _save_final(self, grid) -> None:
        import fsspec

        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / Path(self.final_grid).name
            grid.save(local)
            with open(local, "rb") as src, fsspec.open(self.final_grid, "wb") as dst:
                dst.write(src.read())
            self.logger.log_artifact(local)  # synchronous: uploaded before the folder goes


class BadSampleReport(pl.Callback):
    """Makes skipped train samples visible in the run: see the module docstring.

    ``datamodule`` is the :class:`~aigc.data.loader.ShardDataModule` being fitted: its
    ``bad_per_shard("train")`` are this rank's counts of the epoch, per shard in manifest order
    (the same order on every rank, so they add up element-wise). ``logger`` is the rank's
    ``RunLogger`` (a no-op off rank 0). The tag names the ``worst`` shards over the whole run.
    """

    def __init__(self, datamodule, logger, worst: int = 5):
        self.datamodule, self.logger, self.worst = datamodule, logger, worst
        self._run_total: torch.Tensor | None = None  # rank 0: bad samples per shard over the run

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        from aigc.tracking.lineage import METRIC_BAD_FRACTION, METRIC_BAD_SAMPLES, TAG_DATA_BAD_SHARDS

        # Every rank ends the same epochs (equal batch counts, the same max_steps), so every rank
        # reaches this collective. NCCL reduces device tensors only, hence pl_module.device.
        local = self.datamodule.bad_per_shard("train").to(pl_module.device)
        total = trainer.strategy.reduce(local, reduce_op="sum").cpu()
        if trainer.global_rank != 0:
            return
        self._run_total = total if self._run_total is None else self._run_total + total
        bad = int(total.sum())
        samples = max(1, self.datamodule.num_samples("train"))
        self.logger.log_metrics(
            {METRIC_BAD_SAMPLES: bad, METRIC_BAD_FRACTION: bad / samples}, step=trainer.global_step
        )
        if bad:
            per_shard = zip(self._run_total.tolist(), self.datamodule.shard_names("train"), strict=True)
            ranked = sorted(per_shard, key=lambda item: -item[0])  # stable: ties in manifest order
            worst = [f"{name} ({n})" for n, name in ranked if n][: self.worst]
            self.logger.set_tags({TAG_DATA_BAD_SHARDS: ", ".join(worst)})


class StartupTimer(pl.Callback):
    """Rank 0 logs how long the job took to reach its worker loop, first batch and first optimiser
    step, in seconds since the driver's ``train()`` call (``startup/*`` metrics; cold-start figures
    come from these, see ``benchmarks/cold_start.py``)."""

    def __init__(self, logger, driver_t0: float, worker_t0: float):
        self.logger, self.driver_t0, self.worker_t0 = logger, driver_t0, worker_t0
        self._first_batch: float | None = None
        self._done = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._first_batch is None:
            self._first_batch = time.time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._done or trainer.global_rank != 0:
            return
        self._done = True
        now = time.time()
        self.logger.log_metrics(
            {
                "startup/worker_s": self.worker_t0 - self.driver_t0,
                "startup/first_batch_s": (self._first_batch or now) - self.driver_t0,
                "startup/first_step_s": now - self.driver_t0,
            },
            step=trainer.global_step,
        )


#: The checkpoint entry :class:`SeenSamples` writes (a plain dict of ints, a bool and a uint8 tensor).
SEEN_KEY = "aigc_seen_samples"


class SeenSamples(pl.Callback):
    """Which train samples the current epoch has trained on, over every rank, kept in checkpoints.

    Each rank marks the valid samples of its batches (``batch["index"]``, global indices of the
    split); when a checkpoint is saved the ranks sum their marks (an all-reduce: every rank saves
    together, see :class:`StepCheckpoint`) and the checkpoint holds them bit-packed under
    :data:`SEEN_KEY` with the epoch, the world size and ``replanned`` (whether the epoch's batches
    were already re-planned after a resize). :func:`resume_plan` reads them back. 1 bit a sample:
    10 M samples are 1.25 MB a checkpoint.

    ``start`` is ``(epoch, seen)`` from the checkpoint a run resumes from, so marks keep adding up
    across resumes within the epoch.
    """

    def __init__(self, num_samples: int, start: tuple[int, np.ndarray, bool] | None = None):
        self.seen = torch.zeros(num_samples, dtype=torch.uint8)
        self.epoch, self.replanned = -1, False
        if start is not None:
            epoch, seen, replanned = start
            self.seen[torch.from_numpy(np.asarray(seen, dtype=bool))] = 1
            self.epoch, self.replanned = int(epoch), bool(replanned)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch != self.epoch:
            self.seen.zero_()
            self.epoch, self.replanned = trainer.current_epoch, False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen[batch["index"][batch["valid"]].cpu()] = 1

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        # Every rank is here (Lightning dumps the checkpoint on all ranks, rank 0 writes it). The
        # reduce is in place, hence the copy; NCCL reduces device tensors only.
        total = trainer.strategy.reduce(self.seen.to(pl_module.device, copy=True), reduce_op="max").cpu()
        checkpoint[SEEN_KEY] = {
            "epoch": int(self.epoch),
            "world": int(trainer.world_size),
            "num_samples": int(total.numel()),
            "replanned": bool(self.replanned),
            "bits": torch.from_numpy(np.packbits(total.numpy() > 0)),
        }


def resume_plan(
    checkpoint: dict[str, Any], world: int
) -> tuple[int, int, np.ndarray | None, SeenSamples | None]:
    """How a run resumes its data from a Lightning checkpoint (loaded with ``weights_only=True``):
    ``(epoch, batches of it trained on, seen or None, the SeenSamples callback to train with)``.

    ``seen`` (bool over the train split) is given when the rest of the epoch must be re-planned: the
    world size differs from the epoch's, or the epoch was already re-planned once (its batches are
    no longer the plain plan's). Otherwise the loader skips ``batches`` batches, which is exact."""
    progress = checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]
    epoch, done = int(checkpoint["epoch"]), int(progress["processed"])
    state = checkpoint.get(SEEN_KEY)
    if state is None or int(state["epoch"]) != epoch:
        return epoch, done, None, None
    n = int(state["num_samples"])
    seen = np.unpackbits(state["bits"].numpy(), count=n).astype(bool)
    replan = int(state["world"]) != world or bool(state["replanned"])
    return epoch, done, seen if replan else None, SeenSamples(n, (epoch, seen, replan))

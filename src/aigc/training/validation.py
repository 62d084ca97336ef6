"""Evaluation during training: the ``eval/*`` figures of checkpoints, measured beside the workers.

With ``trainer.eval_every_steps`` the job's ``TorchTrainer`` gets a Ray Train ``ValidationConfig``
(:func:`validation_config`) and :class:`~aigc.training.callbacks.StepCheckpoint` reports every
N-th checkpoint, and the last, with ``validation=True``. Ray Train's controller then runs
:func:`evaluate_checkpoint` on the persisted checkpoint in a Ray task of its own (one at a time, in
report order; ray 2.60 ``MAX_IN_FLIGHT_VALIDATIONS = 1``), while the workers train on: an
evaluation never stalls a training step, it only takes the CPUs it reserves (``trainer.eval_cpus``).

The task measures the checkpoint with :func:`aigc.evaluation.final.final_evaluation`, the one
evaluation every caller uses (same reference evaluator, provenance and guards), then

- logs its ``eval/*`` figures into the job's MLflow run at the checkpoint's step, and its sample
  grid under the artifact key :data:`~aigc.contract.EVAL_GRID_KEY` at that step;
- writes the whole report into the checkpoint's folder (:data:`~aigc.contract.EVAL_FILE`), where
  the driver reads it back to choose the run's checkpoint (:func:`aigc.training.job.best_checkpoint`);
- returns the figures to Ray, whose checkpoint manager ranks checkpoints by
  ``trainer.checkpoint_metric`` and deletes all but the best ``trainer.keep_best_checkpoints`` and
  the newest (``CheckpointConfig(num_to_keep, checkpoint_score_attribute)``); a checkpoint whose
  evaluation is still pending is never deleted, and the ranking is in Ray's snapshot, so a resumed
  job keeps it.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from aigc.contract import (
    CHECKPOINT_NAME,
    EVAL_FILE,
    EVAL_GRID_KEY,
    PROVENANCE,
    STEP_FILE,
    eval_figures,
)

log = logging.getLogger("aigc.training")


def worst_value(mode: str) -> float:
    """What a checkpoint scores before its evaluation arrives: the worst value of a ``mode`` metric."""
    return float("inf") if mode == "min" else float("-inf")


def validation_config(job) -> Any:
    """The ``ray.train.v2.api.validation_config.ValidationConfig`` of a job that evaluates during
    training (``job.run.trainer.eval_every_steps``), or None. ``job`` is the
    :class:`~aigc.training.job.TrainJob`; the task gets what it needs as plain JSON keyword arguments."""
    tc = job.run.trainer
    if not tc.eval_every_steps:
        return None
    from ray.train.v2.api.validation_config import ValidationConfig, ValidationTaskConfig

    kwargs = {
        "tracking_uri": job.tracking_uri,
        "run_id": job.run_id,
        "data_location": job.data_location,
        "num_samples": job.eval_samples,
        "seed": tc.seed,
        "threads": max(1, int(tc.eval_cpus)),
        "prompts": job.sample_prompts,
    }
    return ValidationConfig(
        fn=evaluate_checkpoint,
        task_config=ValidationTaskConfig(fn_kwargs=kwargs),
        ray_remote_kwargs={"num_cpus": tc.eval_cpus},
    )


def evaluate_checkpoint(
    checkpoint,
    *,
    tracking_uri: str,
    run_id: str,
    data_location: str,
    num_samples: int,
    seed: int,
    threads: int,
    prompts: list[str],
) -> dict[str, float]:
    """Ray Train's validation function: measure one persisted checkpoint (see the module docstring)
    and return its ``eval/*`` figures."""
    from aigc.evaluation.final import final_evaluation, log_evaluation
    from aigc.models.export import load_model

    t0 = time.perf_counter()
    with checkpoint.as_directory() as folder:
        step = int(json.loads((Path(folder) / STEP_FILE).read_text())["global_step"])
        module = load_model(Path(folder) / CHECKPOINT_NAME)
    report = final_evaluation(module, data_location, num_samples=num_samples, seed=seed, threads=threads)
    report["step"] = step
    # The report beside the checkpoint: the driver chooses the run's checkpoint from these files,
    # which are deleted with their checkpoint (no record of a deleted checkpoint is left to mislead).
    # Through the checkpoint's own (pyarrow) filesystem: its path has no scheme on S3.
    text = json.dumps(report, indent=2, sort_keys=True, default=str)
    with checkpoint.filesystem.open_output_stream(f"{checkpoint.path}/{EVAL_FILE}") as f:
        f.write(text.encode("utf-8"))
    # Figures at the checkpoint's step; the provenance (the same for every evaluation of the job)
    # as the run's aigc.eval.* tags. The guards of the checkpoint that becomes the run's model are
    # tagged by the driver at the end.
    provenance = {k: v for k, v in report.items() if k in PROVENANCE}
    log_evaluation(tracking_uri, run_id, provenance | eval_figures(report), step=step)
    _log_grid(tracking_uri, run_id, module, prompts, seed, step)
    figures = eval_figures(report)
    print(
        f"aigc: evaluated checkpoint of step {step} in {time.perf_counter() - t0:.1f} s: "
        + ", ".join(f"{k} {v:.4g}" for k, v in sorted(figures.items())),
        flush=True,
    )
    return figures


def _log_grid(tracking_uri: str, run_id: str, module, prompts: list[str], seed: int, step: int) -> None:
    """The sample grid of the evaluated checkpoint (one row per prompt, as the training grids), under
    :data:`EVAL_GRID_KEY` at ``step``: the MLflow UI shows it over steps beside the figures."""
    from aigc.tracking.backend import client_for
    from aigc.training.callbacks import MlflowMetrics
    from aigc.training.grid import image_grid

    n = MlflowMetrics.SAMPLES_PER_PROMPT
    grid = image_grid(module.generate(prompts, num_samples=n, seed=seed), nrow=n)
    client_for(tracking_uri).log_image(run_id, grid, key=EVAL_GRID_KEY, step=step)


__all__ = ["evaluate_checkpoint", "validation_config", "worst_value"]

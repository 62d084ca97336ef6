"""MLflow tracking for training jobs: one run per job, opened by the driver, logged to by rank 0.

Driver::

    uri = resolve_tracking_uri(cfg.tracking.uri)          # absolute; ensure_tracking_store(uri) runs inside
    sha = git_sha(project_root())
    tags = lineage_tags(family, data_name, data_version, workers, sha) | source_tags(command_line(), sha)
    with job_run(uri, cfg.tracking.experiment, cfg.tracking.run_name, flatten_params(cfg), tags) as run:
        log_dataset_input(client_for(run.uri), run.run_id, data_name, shard_dir, dvc_md5)
        launch(run.uri, run.run_id)                       # FINISHED / FAILED / KILLED on the way out
    with resumed_job_run(uri, run_id) as run:             # --resume: the same run, RUNNING again
        launch(run.uri, run.run_id)

``aigc train`` opens the run the first way, but in a child process, so that the driver does not
import MLflow beside Ray's import of torch (:mod:`aigc.tracking.opener`)::

    opener = RunOpener(uri, experiment, run_name, params, tags, dataset={"name": ..., ...})
    run = opener.result()                                  # or opener.abandon(err) if the driver fails
    with guard_run(run.uri, run.run_id):
        launch(run.uri, run.run_id)

Worker::

    logger = RunLogger.for_rank(rank, uri, run_id, system_metrics=cfg.tracking.system_metrics)
    logger.log_metrics({"train/loss": loss}, step)       # non-blocking
    logger.close()
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Names are loaded on first use: mlflow takes seconds to import, and `aigc ui` / `aigc --help` only
# need the light store helpers.
_EXPORTS = {
    "JobRun": "lifecycle",
    "end_job_run": "lifecycle",
    "get_or_create_experiment": "lifecycle",
    "guard_run": "lifecycle",
    "reopen_job_run": "lifecycle",
    "resumed_job_run": "lifecycle",
    "job_run": "lifecycle",
    "start_job_run": "lifecycle",
    "EXPERIMENT_KIND": "context",
    "TAG_EXPERIMENT_KIND": "context",
    "TAG_RUN_NOTE": "context",
    "command_line": "context",
    "run_description": "context",
    "source_tags": "context",
    "METRIC_BAD_FRACTION": "lineage",
    "METRIC_BAD_SAMPLES": "lineage",
    "TAG_DATA_BAD_SHARDS": "lineage",
    "TAG_DATA_MODIFIED": "lineage",
    "TAG_DATA_MODIFIED_SHARDS": "lineage",
    "TAG_DATA_NAME": "lineage",
    "TAG_DATA_VERSION": "lineage",
    "TAG_ERROR": "lineage",
    "TAG_FAMILY": "lineage",
    "TAG_GIT_SHA": "lineage",
    "TAG_RAY_WORKERS": "lineage",
    "TAG_REGISTERED_MODEL": "lineage",
    "data_modified_tags": "lineage",
    "git_sha": "lineage",
    "skipped_samples": "lineage",
    "lineage_tags": "lineage",
    "log_dataset_input": "lineage",
    "logged_dataset": "lineage",
    "NullRunLogger": "logger",
    "RunOpener": "opener",
    "RunLogger": "logger",
    "flatten_params": "params",
    "truncate": "params",
    "format_runs_table": "runs",
    "list_runs": "runs",
    "model_figures": "runs",
    "mlflow_server_command": "server",
    "TrackingUnavailable": "backend",
    "client_for": "backend",
    "default_artifact_root": "backend",
    "ensure_tracking_store": "backend",
    "resolve_tracking_uri": "backend",
}

__all__ = [
    "EXPERIMENT_KIND",
    "JobRun",
    "METRIC_BAD_FRACTION",
    "METRIC_BAD_SAMPLES",
    "NullRunLogger",
    "RunLogger",
    "RunOpener",
    "TAG_DATA_BAD_SHARDS",
    "TAG_DATA_MODIFIED",
    "TAG_DATA_MODIFIED_SHARDS",
    "TAG_DATA_NAME",
    "TAG_DATA_VERSION",
    "TAG_ERROR",
    "TAG_EXPERIMENT_KIND",
    "TAG_FAMILY",
    "TAG_GIT_SHA",
    "TAG_RAY_WORKERS",
    "TAG_REGISTERED_MODEL",
    "TAG_RUN_NOTE",
    "TrackingUnavailable",
    "command_line",
    "data_modified_tags",
    "default_artifact_root",
    "end_job_run",
    "ensure_tracking_store",
    "flatten_params",
    "format_runs_table",
    "get_or_create_experiment",
    "guard_run",
    "reopen_job_run",
    "resumed_job_run",
    "git_sha",
    "job_run",
    "lineage_tags",
    "list_runs",
    "model_figures",
    "log_dataset_input",
    "logged_dataset",
    "mlflow_server_command",
    "resolve_tracking_uri",
    "run_description",
    "skipped_samples",
    "source_tags",
    "start_job_run",
    "truncate",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'aigc.tracking' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"aigc.tracking.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:
    from aigc.tracking.backend import (
        TrackingUnavailable,
        default_artifact_root,
        ensure_tracking_store,
        resolve_tracking_uri,
    )
    from aigc.tracking.context import (
        EXPERIMENT_KIND,
        TAG_EXPERIMENT_KIND,
        TAG_RUN_NOTE,
        command_line,
        run_description,
        source_tags,
    )
    from aigc.tracking.lifecycle import (
        JobRun,
        end_job_run,
        get_or_create_experiment,
        guard_run,
        job_run,
        reopen_job_run,
        resumed_job_run,
        start_job_run,
    )
    from aigc.tracking.lineage import (
        METRIC_BAD_FRACTION,
        METRIC_BAD_SAMPLES,
        TAG_DATA_BAD_SHARDS,
        TAG_DATA_MODIFIED,
        TAG_DATA_MODIFIED_SHARDS,
        TAG_DATA_NAME,
        TAG_DATA_VERSION,
        TAG_ERROR,
        TAG_FAMILY,
        TAG_GIT_SHA,
        TAG_RAY_WORKERS,
        TAG_REGISTERED_MODEL,
        data_modified_tags,
        git_sha,
        lineage_tags,
        log_dataset_input,
        logged_dataset,
        skipped_samples,
    )
    from aigc.tracking.logger import NullRunLogger, RunLogger
    from aigc.tracking.opener import RunOpener
    from aigc.tracking.params import flatten_params, truncate
    from aigc.tracking.runs import format_runs_table, list_runs
    from aigc.tracking.server import mlflow_server_command

"""One MLflow run per training job, opened and closed by the driver.

Everything goes through ``client_for(uri)`` rather than the fluent ``mlflow.start_run`` API: no
active run or tracking URI is set globally, so nothing leaks into other code in the driver process
(Ray, the registry, tests) and the run id is the only thing the workers need.
"""

from __future__ import annotations

import logging
import re
import traceback
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aigc.tracking.backend import client_for, default_artifact_root, ensure_tracking_store, is_local_store
from aigc.tracking.context import EXPERIMENT_KIND, TAG_EXPERIMENT_KIND, needs_experiment_kind
from aigc.tracking.lineage import TAG_ERROR
from aigc.tracking.params import (
    MAX_PARAMS_PER_BATCH,
    MAX_TAG_VALUE_LENGTH,
    chunked,
    flatten_params,
    truncate,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient

# MLflow is imported inside the functions that use it: the driver holds guard_run's lifecycle from
# before it has imported MLflow (the run is opened in a child process, see aigc.tracking.opener).

_log = logging.getLogger(__name__)

END_STATUSES = ("FINISHED", "FAILED", "KILLED")


@dataclass(frozen=True)
class JobRun:
    """What the driver hands to workers: the absolute store URI and the run to log to."""

    uri: str
    run_id: str
    experiment_id: str


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "experiment"


def get_or_create_experiment(client: MlflowClient, name: str, artifact_location: str | None = None) -> str:
    """The id of experiment ``name``, created if missing, tagged as a model-training experiment.

    The ``mlflow.experimentKind`` tag marks it as model training for MLflow (see
    :mod:`aigc.tracking.context`); an existing experiment gets it unless someone chose a kind.
    A new experiment in a local store (sqlite/file) gets its artifacts under the store's artifact
    root (``mlflow/artifacts/<name>`` for the project store, see ``default_artifact_root``), not in
    ``./mlruns`` of whatever directory the driver happens to run in. On a tracking server the
    server's own artifact root applies. A deleted experiment raises ``ValueError`` (MLflow refuses
    to log to it) with the way out.
    """
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            raise ValueError(
                f"MLflow experiment {name!r} (id {experiment.experiment_id}) is deleted: restore it with "
                f"`mlflow experiments restore --experiment-id {experiment.experiment_id}` or pick another "
                "tracking.experiment"
            )
        if needs_experiment_kind(experiment.tags.get(TAG_EXPERIMENT_KIND)):
            client.set_experiment_tag(experiment.experiment_id, TAG_EXPERIMENT_KIND, EXPERIMENT_KIND)
        return experiment.experiment_id
    uri = client.tracking_uri
    if artifact_location is None and is_local_store(uri):
        artifact_location = f"{default_artifact_root(uri)}/{_slug(name)}"
    try:
        return client.create_experiment(
            name, artifact_location=artifact_location, tags={TAG_EXPERIMENT_KIND: EXPERIMENT_KIND}
        )
    except MlflowException as e:
        # Another driver created it between our lookup and create_experiment.
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def start_job_run(
    uri: str,
    experiment: str,
    run_name: str | None = None,
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, str] | None = None,
) -> str:
    """Create the job's run (status RUNNING) and log its params and tags; returns the run id.

    Checks the store first (``ensure_tracking_store``: a dead server fails here in seconds, a fresh
    sqlite store is migrated before any worker opens it). ``params`` may be flat dotted keys or a
    nested config: it goes through ``flatten_params`` and is sent in batches of 100. If logging the
    params fails the run is ended FAILED, never left RUNNING.
    """
    from mlflow.entities import Param

    ensure_tracking_store(uri)
    client = client_for(uri)
    experiment_id = get_or_create_experiment(client, experiment)
    run_tags = {k: truncate(str(v), MAX_TAG_VALUE_LENGTH) for k, v in (tags or {}).items()}
    run = client.create_run(experiment_id, run_name=run_name, tags=run_tags)
    run_id = run.info.run_id
    try:
        flat = flatten_params(params or {})
        for batch in chunked([Param(k, v) for k, v in flat.items()], MAX_PARAMS_PER_BATCH):
            client.log_batch(run_id, params=batch)
    except BaseException as e:
        end_run_with_error(uri, run_id, e)
        raise
    return run_id


def end_job_run(uri: str, run_id: str, status: str = "FINISHED", error: str | None = None) -> None:
    """End the run with ``status`` (FINISHED, FAILED or KILLED); ``error`` becomes the ``aigc.error``
    tag (truncated to MLflow's 8000 characters, keeping the end, where the exception is)."""
    if status not in END_STATUSES:
        raise ValueError(f"run status must be one of {', '.join(END_STATUSES)}, got {status!r}")
    client = client_for(uri)
    if error:
        client.set_tag(run_id, TAG_ERROR, truncate(error, MAX_TAG_VALUE_LENGTH, keep_tail=True))
    client.set_terminated(run_id, status=status)


def _describe(exc: BaseException) -> str:
    """The exception line first (what the UI shows in a cell), then the traceback."""
    head = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    tb = "".join(traceback.format_tb(exc.__traceback__))
    return f"{head}\n\nTraceback (most recent call last):\n{tb}{head}" if tb else head


def _end_quietly(uri: str, run_id: str, status: str, error: str | None) -> None:
    # Used while an exception is already propagating: a second failure (store gone) must not hide it.
    try:
        end_job_run(uri, run_id, status, error)
    except Exception:  # noqa: BLE001
        _log.warning("could not mark MLflow run %s %s in %s", run_id, status, uri, exc_info=True)


def end_run_with_error(uri: str, run_id: str, error: BaseException) -> None:
    """End the run FAILED for an ``Exception``, KILLED for KeyboardInterrupt, SystemExit and the
    like, with ``error`` described in ``aigc.error``. Called while ``error`` propagates, so a store
    that fails now is logged, not raised over it."""
    _end_quietly(uri, run_id, "FAILED" if isinstance(error, Exception) else "KILLED", _describe(error))


@contextmanager
def guard_run(uri: str, run_id: str) -> Iterator[None]:
    """End an existing run FINISHED when the block completes, FAILED (with the ``aigc.error`` tag)
    on an exception, KILLED on KeyboardInterrupt or another non-``Exception`` exit such as
    ``SystemExit``; re-raises. No run is left RUNNING."""
    try:
        yield
    except BaseException as e:  # an Exception, or KeyboardInterrupt, SystemExit, GeneratorExit
        end_run_with_error(uri, run_id, e)
        raise
    end_job_run(uri, run_id, "FINISHED")


def reopen_job_run(uri: str, run_id: str) -> None:
    """Mark an ended run RUNNING again (``aigc train --resume`` continues into the same run).

    Prefer :func:`resumed_job_run`, which also guards the run."""
    ensure_tracking_store(uri)
    client = client_for(uri)
    client.get_run(run_id)  # a clear MlflowException if the run is gone
    client.update_run(run_id, status="RUNNING")
    if TAG_ERROR in client.get_run(run_id).data.tags:
        client.delete_tag(run_id, TAG_ERROR)  # the old failure is history; a new one is tagged anew


@contextmanager
def job_run(
    uri: str,
    experiment: str,
    run_name: str | None = None,
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, str] | None = None,
) -> Iterator[JobRun]:
    """The driver's run: ``with job_run(...) as run: launch(run.uri, run.run_id)``.

    Creates the run, then behaves as :func:`guard_run`: no run is left RUNNING.
    """
    run_id = start_job_run(uri, experiment, run_name, params, tags)
    experiment_id = client_for(uri).get_run(run_id).info.experiment_id
    with guard_run(uri, run_id):
        yield JobRun(uri=uri, run_id=run_id, experiment_id=experiment_id)


@contextmanager
def resumed_job_run(uri: str, run_id: str) -> Iterator[JobRun]:
    """The driver's run when a job is resumed: reopens ``run_id`` (:func:`reopen_job_run`), then
    behaves as :func:`guard_run`, so a resume that fails leaves the run FAILED, never RUNNING."""
    reopen_job_run(uri, run_id)
    experiment_id = client_for(uri).get_run(run_id).info.experiment_id
    with guard_run(uri, run_id):
        yield JobRun(uri=uri, run_id=run_id, experiment_id=experiment_id)

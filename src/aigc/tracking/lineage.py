"""Lineage of a training run: which code (git sha), which data (DVC md5, and how much of it the run
could not read or found changed), how many workers."""

from __future__ import annotations

import subprocess
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from aigc.contract import (  # noqa: F401 - re-exported for aigc.tracking
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
    TAG_RUN_NAME,
    TAG_STORAGE,
)
from aigc.tracking.params import MAX_TAG_VALUE_LENGTH, truncate

if TYPE_CHECKING:
    from mlflow import MlflowClient

# MLflow is imported only by the functions that talk to a store: the driver builds a run's tags
# before it imports MLflow (the run is opened in a child process, see aigc.tracking.opener).

# MLflow 3.17 rejects longer dataset digests; a DVC folder md5 ("<32 hex>.dir") is exactly 36.
MAX_DATASET_DIGEST_LENGTH = 36


def lineage_tags(
    family: str,
    data_name: str | None,
    data_version: str | None,
    workers: int | None,
    git_sha: str | None,
    registered_model: str | None = None,
) -> dict[str, str]:
    """The run's lineage tags. Unknown values (None) are left out rather than written as a placeholder,
    so two runs never look comparable because both say "unknown"."""
    values = {
        TAG_FAMILY: family,
        TAG_GIT_SHA: git_sha,
        TAG_DATA_NAME: data_name,
        TAG_DATA_VERSION: data_version,
        TAG_RAY_WORKERS: None if workers is None else str(int(workers)),
        TAG_REGISTERED_MODEL: registered_model,
    }
    return {k: truncate(str(v), MAX_TAG_VALUE_LENGTH) for k, v in values.items() if v is not None}


def data_modified_tags(problems: list[str]) -> dict[str, str]:
    """The tags of a run that trains on shards differing from their manifest (``problems``: one line
    per shard, naming it); none when nothing differs."""
    if not problems:
        return {}
    return {
        TAG_DATA_MODIFIED: "true",
        TAG_DATA_MODIFIED_SHARDS: truncate("; ".join(problems), MAX_TAG_VALUE_LENGTH),
    }


def skipped_samples(client: MlflowClient, run_id: str) -> tuple[int, float, str | None]:
    """What a run recorded of the train samples its loader skipped: the most in one epoch (summed
    over ranks), the highest fraction of the split in one epoch, and the worst shards over the run
    (``"name (count), ..."``, None when no sample was skipped)."""
    counts = client.get_metric_history(run_id, METRIC_BAD_SAMPLES)
    fractions = client.get_metric_history(run_id, METRIC_BAD_FRACTION)
    return (
        int(max((m.value for m in counts), default=0)),
        float(max((m.value for m in fractions), default=0.0)),
        client.get_run(run_id).data.tags.get(TAG_DATA_BAD_SHARDS),
    )


def git_sha(path: str | Path = ".") -> str | None:
    """``git rev-parse HEAD`` of the repository holding ``path``, with ``-dirty`` appended when tracked
    files differ from HEAD (untracked files are ignored: data and stores are git-ignored anyway).

    None when ``path`` is not in a git work tree, the repository has no commit yet, or git is missing.
    """
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, timeout=10, check=False
        )
        if head.returncode != 0:
            return None
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=path,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    sha = head.stdout.strip()
    dirty = status.returncode == 0 and bool(status.stdout.strip())
    return f"{sha}-dirty" if dirty else sha


def log_dataset_input(
    client: MlflowClient,
    run_id: str,
    name: str,
    source: str,
    digest: str,
    context: str = "training",
) -> None:
    """Record the dataset a run trained on (the UI's "Datasets used").

    ``source`` is where the data lives: the shard folder's absolute path or its DVC remote URL
    (``s3://``, ``gs://``, ``https://``, a local path). ``digest`` is the DVC md5 of the shard folder;
    MLflow allows at most 36 characters, so a longer one raises ``ValueError`` naming it (put longer
    hashes in tags).
    """
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    if not digest or len(digest) > MAX_DATASET_DIGEST_LENGTH:
        raise ValueError(
            f"dataset digest {digest!r} for {name!r} must be 1..{MAX_DATASET_DIGEST_LENGTH} characters "
            "(MLflow's limit; a DVC '<md5>.dir' fits)"
        )
    with warnings.catch_warnings():
        # A local path matches two registered resolvers that both give LocalArtifactDatasetSource.
        warnings.simplefilter("ignore", UserWarning)
        try:
            dataset_source = resolve_dataset_source(source)
        except Exception as e:  # noqa: BLE001 - MlflowException with a generic message
            raise ValueError(
                f"cannot record dataset source {source!r} for {name!r}: MLflow knows no source for that "
                "URI scheme (use a local path, s3://, gs://, or http(s)://)"
            ) from e
    dataset = MetaDataset(source=dataset_source, name=name, digest=digest)
    client.log_inputs(
        run_id,
        datasets=[
            DatasetInput(
                dataset=dataset._to_mlflow_entity(),
                tags=[InputTag(key=MLFLOW_DATASET_CONTEXT, value=context)],
            )
        ],
    )


def logged_dataset(run) -> tuple[str, str, str] | None:
    """``(name, location, digest)`` of the first dataset :func:`log_dataset_input` recorded in
    ``run`` (an MLflow ``Run``), or None. The location is the source's URI (MLflow stores the
    source as JSON, e.g. ``{"uri": "/abs/datasets/digits"}``)."""
    import json

    inputs = run.inputs.dataset_inputs if run.inputs else []
    if not inputs:
        return None
    dataset = inputs[0].dataset
    location = dataset.source
    try:
        parsed = json.loads(location)
        if isinstance(parsed, dict) and parsed.get("uri"):
            location = parsed["uri"]
    except ValueError:
        pass
    return dataset.name, location, dataset.digest

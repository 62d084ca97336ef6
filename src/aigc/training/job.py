"""One training job's record, the checks that lead to it, and the run folder it lives in.

:class:`TrainJob` is the driver -> worker contract and the job file in one typed object: the
driver resolves everything a worker needs (absolute data location and tracking URI, the MLflow run,
the tokenizer, the sample-grid prompts) into a ``TrainJob``, writes it to
``<storage>/<name>/aigc-job.json``, and hands the same JSON to every Ray worker;
``aigc train --resume NAME`` reads it back. Workers run in Ray's session folder, possibly on other
machines, so every path in it is absolute and every value plain JSON. The run folder's other
contents (the checkpoints, :func:`complete_checkpoints`, :func:`final_checkpoint`) are named by
:mod:`aigc.contract`.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import Field

from aigc.config import FAMILIES, RunConfig, StrictModel
from aigc.contract import (
    CHECKPOINT_DIR_PREFIX,
    CHECKPOINT_FILES,
    CHECKPOINT_NAME,
    DEFAULT_EVAL_SAMPLES,
    EVAL_FILE,
    JOB_FILE,
    STEP_FILE,
    TAG_DATA_MODIFIED,
    checkpoint_dir_name,
)

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class TrainError(RuntimeError):
    """A training job could not start or did not finish; the message says why."""


class TrainJob(StrictModel):
    """Everything one training job is: written to ``aigc-job.json``, passed to every worker."""

    name: str = Field(description="run name: the folder under the storage path")
    run_id: str = Field(description="the job's MLflow run")
    experiment_id: str
    tracking_uri: str = Field(description="absolute MLflow tracking URI (workers log here)")
    run: RunConfig = Field(description="the resolved run config (the checkpoint was written with it)")
    tokenizer: dict[str, Any] = Field(description="Tokenizer.to_dict() built from the train captions")
    image_size: int
    channels: int
    latent: dict[str, Any] | None = Field(
        None, description="the latent section of a latent dataset's manifest (aigc.data.latents)"
    )
    data_location: str = Field(description="absolute shard folder or fsspec URL")
    data_version: str = Field(description="DVC md5 of the shard folder, else the manifest digest")
    run_dir: str = Field(description="<storage>/<name>: checkpoints, the job file, the final grid")
    sample_prompts: list[str] = Field(description="prompts of every sample grid of the run")
    launched_at: float = Field(0.0, description="time.time() of this launch's train() call")
    allow_modified_data: bool = Field(
        False, description="train on shards that differ from the manifest (--allow-modified-data)"
    )
    resumed: bool = Field(
        False, description="this launch is an `aigc train --resume`: see worker.train_loop's fallback"
    )
    eval_samples: int = Field(
        DEFAULT_EVAL_SAMPLES,
        description="samples per evaluation during training: trainer.eval_samples, else --eval-samples",
    )
    init_from: str | None = Field(
        None,
        description="the export folder (in the run folder, INIT_DIR) whose weights the model starts from "
        "before step 0: aigc train --init-from",
    )

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainJob:
        return cls.model_validate(data)


# ------------------------------------------------------------------------ paths and checks


def absolute(path: str, root: Path) -> str:
    """Absolute local path, or a URI left as it is (s3://, gs://, file://...)."""
    if "://" in path:
        return path
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (root / p).resolve())


def storage_location(cfg: RunConfig, root: Path) -> str:
    """Where the job's run folder lives: ``scaling.storage_path`` made absolute.

    A relative path inside a Ray working-dir package (``ray job submit --working-dir``) is refused:
    the checkpoints would land in a folder Ray deletes with its session.
    """
    from aigc import DURABLE_SETTINGS_HINT, ray_package

    path = cfg.scaling.storage_path
    package = ray_package(root)
    if package is not None and "://" not in path and not Path(path).expanduser().is_absolute():
        raise TrainError(
            f"scaling.storage_path {path!r} would put the checkpoints in {root / path}, inside the Ray "
            f"working-dir package {package.name} that Ray deletes with its session. {DURABLE_SETTINGS_HINT}."
        )
    return absolute(path, root).rstrip("/")


def data_location(cfg: RunConfig, root: Path) -> str:
    """The shard folder the job streams: ``data.location``, else ``<data.root>/<data.name>``, made
    absolute against ``root`` (:func:`aigc.data.location.resolve_location`, as everywhere else)."""
    from aigc.data.location import resolve_location

    return resolve_location(cfg.data, root=root)


def dataset_manifest(location: str) -> dict[str, Any]:
    """The manifest of the dataset at ``location``; a ``TrainError`` that says how to get one."""
    from aigc import ray_package
    from aigc.data.manifest import DatasetError, read_manifest

    try:
        return read_manifest(location)
    except DatasetError as err:
        package = None if "://" in location else ray_package(Path(location))
        if package is not None:
            raise TrainError(
                f"{err}. The job runs in the Ray working-dir package {package.name}, and the upload leaves "
                "out git-ignored files such as shards: set data.location to a folder every node can read "
                "(an absolute path) or a URL (s3://...), e.g. --set data.location=s3://bucket/datasets/digits"
            ) from None
        if not isinstance(err, FileNotFoundError):  # unreadable (credentials, endpoint) or invalid: says so
            raise TrainError(str(err)) from None
        raise TrainError(f"{err}; build it first, e.g. `aigc data build {Path(location).name}`") from None


def check_latent_data(cfg: RunConfig, location: str, manifest: dict[str, Any]) -> None:
    """A latent dataset (``aigc data encode``) is refused, before anything starts, for a family that
    cannot learn on its kind of latents; a malformed latent section names the dataset. An image
    dataset passes."""
    if manifest.get("latent") is None:
        return
    from aigc.data.latents import latent_spec
    from aigc.data.manifest import DatasetError
    from aigc.models import module_class

    try:
        kind = latent_spec(manifest)["kind"]
    except DatasetError as err:
        raise TrainError(str(err)) from None
    allowed = module_class(cfg.model.family).latent_kinds
    if kind not in allowed:
        learners = [f for f in FAMILIES if kind in module_class(f).latent_kinds]
        raise TrainError(
            f"{location} holds {kind} latents (aigc data encode); model.family "
            f"{cfg.model.family!r} learns on {', '.join(allowed) or 'images only'}: use "
            f"{' or '.join(learners)} on them, or train on the image dataset"
        )
    if kind == "sd":  # before any run: latents of another VAE would train a UNet its VAE cannot decode
        from aigc.models.sd import check_dataset_vae

        try:
            check_dataset_vae(cfg.model.pipeline, location, manifest)
        except (ValueError, FileNotFoundError) as err:
            raise TrainError(str(err)) from None


def new_run_name(cfg: RunConfig, name: str | None) -> str:
    """``name``, checked, or ``<family>-<UTC timestamp>``."""
    name = name or f"{cfg.model.family}-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S-%f')}"
    if not _NAME_RE.match(name):
        raise TrainError(f"run name {name!r}: use letters, digits, '.', '_' and '-' (max 128)")
    return name


def run_exists(storage: str, name: str) -> bool:
    """Whether ``<storage>/<name>`` exists; a ``TrainError`` naming the URL when it cannot be asked."""
    import fsspec

    from aigc.data.manifest import unreachable

    url = f"{storage}/{name}"
    try:
        fs, path = fsspec.core.url_to_fs(url)
        return fs.exists(path)
    except Exception as err:  # noqa: BLE001 - credentials, endpoint, bucket: all named below
        raise TrainError(f"cannot read the storage path {url}: {unreachable(url, err)}") from None


def check_storage(storage: str) -> None:
    """Write and delete a small object under ``storage``: a storage path the job cannot write (a
    missing bucket, read-only credentials, a full disk) fails here, before the MLflow run opens,
    instead of after Ray started, with a FAILED run left behind."""
    import uuid

    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    from aigc.data.manifest import unreachable

    probe = f"{storage}/.aigc-write-check-{uuid.uuid4().hex}"
    try:
        fs, path = fsspec.core.url_to_fs(probe)
        if isinstance(fs, LocalFileSystem):
            # Only local folders: s3fs's makedirs would create a missing bucket instead of failing.
            fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(path, b"aigc")
        fs.rm_file(path)
    except Exception as err:  # noqa: BLE001 - reported with the URL and what to check
        raise TrainError(
            f"cannot write to the storage path {storage} (scaling.storage_path, AIGC_STORAGE_PATH): "
            f"{unreachable(storage, err)}. Nothing started (no MLflow run was created, Ray was not started)."
        ) from None


def sample_prompts(location: str, n: int = 8) -> list[str]:
    """The first ``n`` distinct val captions: the prompts of every sample grid of the run."""
    from aigc.data.captions_io import read_captions

    prompts: list[str] = []
    for caption in read_captions(location, "val"):
        if caption not in prompts:
            prompts.append(caption)
        if len(prompts) == n:
            break
    return prompts or [""]


def check_data(
    location: str, manifest: dict[str, Any], *, verify: bool, allow: bool, resuming: bool
) -> list[str]:
    """The shards that differ from the manifest, one line each (empty when none do).

    One stat per shard (:func:`~aigc.data.manifest.check_sizes`); with ``verify`` every shard is
    re-hashed too (:func:`~aigc.data.manifest.verify_dataset`, local folders only). Tars the manifest
    does not list are left out: the loader never reads them. Unless ``allow``, a difference is a
    ``TrainError`` naming the shards: the run's data version (the manifest's, or DVC's) would
    describe data the run does not see. Runs before any MLflow run is opened and before Ray starts.
    """
    from aigc.data.manifest import check_sizes, verify_dataset

    if verify:
        folder = location.removeprefix("file://")
        if "://" in folder:
            raise TrainError(
                f"--verify-data re-hashes local shard folders, not {location}; without the flag every "
                "shard's size is still checked against the manifest"
            )
        report = verify_dataset(folder)
    else:
        report = check_sizes(location, manifest)
    report.extra = []  # tars the manifest does not list are never read
    problems = report.problems()
    if problems and not allow:
        started = "the run was not reopened" if resuming else "no MLflow run was created"
        raise TrainError(
            f"{location}: shards differ from the manifest, so the run's data version would not describe "
            f"the data it trains on: {'; '.join(problems)}. Nothing started ({started}, Ray was not "
            "started). Restore the shards (e.g. `dvc checkout`), rebuild the dataset with "
            "`aigc data build --overwrite`, or pass --allow-modified-data to train on them as they are "
            f"(the run is then tagged {TAG_DATA_MODIFIED})."
        )
    return problems


# ------------------------------------------------------------------------------ run folder


def read_job(storage: str, name: str) -> TrainJob:
    """The job file of run ``name``; a ``TrainError`` when there is none to resume."""
    import fsspec

    url = f"{storage}/{name}/{JOB_FILE}"
    try:
        with fsspec.open(url, "rt", encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise TrainError(f"nothing to resume: no run {name!r} under {storage} ({url} is missing)") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise TrainError(f"{url}: not a readable job file: {err}") from None
    except Exception as err:  # noqa: BLE001 - credentials, endpoint, bucket: all named below
        from aigc.data.manifest import unreachable

        raise TrainError(f"cannot read {url}: {unreachable(url, err)}") from None
    try:
        return TrainJob.from_json(data)
    except ValueError as err:
        raise TrainError(f"{url}: not an aigc job file of this version: {err}") from None


def write_job(job: TrainJob) -> str:
    """Write ``job`` to ``<run_dir>/aigc-job.json``; returns its URL."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(job.run_dir)
    fs.makedirs(path, exist_ok=True)
    url = f"{job.run_dir}/{JOB_FILE}"
    with fsspec.open(url, "wt", encoding="utf-8") as f:
        json.dump(job.to_json(), f, indent=2)
    return url


def complete_checkpoints(run_dir: str) -> list[str]:
    """The complete ``checkpoint-step*`` folders under a run folder (local or URL), as URLs, newest
    last: those holding every file aigc writes in one (:data:`aigc.contract.CHECKPOINT_FILES`), none
    of them empty. A folder a storage outage cut short (files missing, or left empty by an upload
    that failed) is left out. The folders' names sort in step order
    (:func:`aigc.contract.checkpoint_dir_name`)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(run_dir)
    root = path.rstrip("/")
    fs.invalidate_cache(root)  # s3fs keeps listings: this one must see the storage as it is now
    complete = []
    for folder in sorted(fs.glob(f"{root}/{CHECKPOINT_DIR_PREFIX}*")):
        if not fs.isdir(folder):
            continue
        sizes = {
            info["name"].rstrip("/").rsplit("/", 1)[-1]: info.get("size") or 0
            for info in fs.ls(folder, detail=True)
            if info["type"] == "file"
        }
        if all(sizes.get(name, 0) > 0 for name in CHECKPOINT_FILES):
            complete.append(f"{run_dir.rstrip('/')}/{folder.rsplit('/', 1)[-1]}")
    return complete


def final_checkpoint(run_dir: str) -> str | None:
    """The checkpoint file of the newest complete ``checkpoint-step*`` folder under a run folder
    (:func:`complete_checkpoints`), or None when there is none: a folder cut short is never loaded
    or exported. After a ``--resume`` the newest is the resumed job's last, whichever launch wrote it."""
    complete = complete_checkpoints(run_dir)
    return f"{complete[-1]}/{CHECKPOINT_NAME}" if complete else None


def evaluated_checkpoints(run_dir: str) -> list[dict[str, Any]]:
    """The reports of the complete checkpoints that were evaluated during training (the
    :data:`~aigc.contract.EVAL_FILE` :mod:`aigc.training.validation` writes into a checkpoint's
    folder), oldest first, each with ``checkpoint`` (the Lightning file's URL) and ``step`` added."""
    import fsspec

    reports = []
    for folder in complete_checkpoints(run_dir):
        fs, path = fsspec.core.url_to_fs(f"{folder}/{EVAL_FILE}")
        if not fs.exists(path):
            continue
        with fs.open(path, "r") as f:
            report = json.load(f)
        with fsspec.open(f"{folder}/{STEP_FILE}", "r") as f:
            report["step"] = int(json.load(f)["global_step"])
        reports.append(report | {"checkpoint": f"{folder}/{CHECKPOINT_NAME}"})
    return reports


def best_checkpoint(run_dir: str, metric: str, mode: str) -> dict[str, Any] | None:
    """The report (:func:`evaluated_checkpoints`) of the complete checkpoint with the best
    ``metric`` (``mode`` "min" or "max"; a tie goes to the later step), or None when no complete
    checkpoint was evaluated with that figure."""
    scored = [r for r in evaluated_checkpoints(run_dir) if isinstance(r.get(metric), (int, float))]
    if not scored:
        return None
    sign = 1.0 if mode == "min" else -1.0
    return min(scored, key=lambda r: (sign * float(r[metric]), -r["step"]))


def step_checkpoint(run_dir: str, step: int) -> str | None:
    """The checkpoint file of step ``step`` under a run folder if that folder is complete, else None."""
    folder = f"{run_dir.rstrip('/')}/{checkpoint_dir_name(step)}"
    return f"{folder}/{CHECKPOINT_NAME}" if folder in complete_checkpoints(run_dir) else None

"""The driver side of ``aigc train``: validate, resolve, open the MLflow run, run Ray Train.

Order matters (STACK-NOTES): the config is validated and the tracking store reached (and, for
sqlite, initialised) before Ray starts, so a bad config or an unreachable server fails in seconds
and no worker ever races a schema migration. One MLflow run per job, opened here; workers get its
id and only rank 0 logs to it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from aigc import project_root
from aigc.config import ConfigError, RunConfig, load_config

log = logging.getLogger("aigc.training")

JOB_FILE = "aigc-job.json"  # in <storage>/<name>/: the MLflow run id and resolved config, for --resume
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class TrainError(RuntimeError):
    """A training job could not start or did not finish; the message says why."""


@dataclass
class TrainResult:
    name: str
    run_id: str
    experiment_id: str
    tracking_uri: str
    status: str
    global_step: int
    checkpoint: str | None
    run_dir: str
    metrics: dict[str, float] = field(default_factory=dict)
    eval: dict[str, Any] = field(default_factory=dict)
    sample_grid: str | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------ resolution


def resolve_config(
    config: str | Path | RunConfig | None,
    overrides: list[str] | None = None,
    workers: int | None = None,
    gpus_per_worker: float | None = None,
    ray_address: str | None = None,
) -> RunConfig:
    """The run config with the command-line options applied; errors name the key."""
    cfg = config if isinstance(config, RunConfig) else load_config(config, overrides)
    if isinstance(config, RunConfig) and overrides:
        from aigc.config import apply_overrides, validate

        cfg = validate(RunConfig, apply_overrides(config.model_dump(mode="json"), overrides))
    if workers is not None:
        if workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {workers}")
        cfg.scaling.num_workers = workers
    if gpus_per_worker is not None:
        cfg.scaling.gpus_per_worker = gpus_per_worker
        cfg.scaling.use_gpu = gpus_per_worker > 0
    if ray_address is not None:
        cfg.scaling.ray_address = ray_address
    return cfg


def _absolute(path: str, root: Path) -> str:
    """Absolute local path, or a URI left as it is (s3://, gs://, file://...)."""
    if "://" in path:
        return path
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (root / p).resolve())


def data_location(cfg: RunConfig, root: Path) -> str:
    loc = cfg.data.location or str(Path(cfg.data.root) / cfg.data.name)
    return _absolute(loc, root)


def _read_manifest(location: str) -> dict[str, Any]:
    import fsspec

    try:
        with fsspec.open(f"{location.rstrip('/')}/manifest.json", "rt", encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise TrainError(
            f"no dataset at {location} (manifest.json missing); build it first, e.g. "
            f"`aigc data build {Path(location).name}`"
        ) from None


def _storage(cfg: RunConfig, root: Path) -> str:
    return _absolute(cfg.scaling.storage_path, root)


def _run_exists(storage: str, name: str) -> bool:
    import fsspec

    fs, path = fsspec.core.url_to_fs(f"{storage.rstrip('/')}/{name}")
    return fs.exists(path)


def _read_job(storage: str, name: str) -> dict[str, Any] | None:
    import fsspec

    url = f"{storage.rstrip('/')}/{name}/{JOB_FILE}"
    try:
        with fsspec.open(url, "rt") as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def _write_job(storage: str, name: str, job: dict[str, Any]) -> None:
    import fsspec

    fs, path = fsspec.core.url_to_fs(f"{storage.rstrip('/')}/{name}")
    fs.makedirs(path, exist_ok=True)
    with fsspec.open(f"{storage.rstrip('/')}/{name}/{JOB_FILE}", "wt") as f:
        json.dump(job, f, indent=2)


# --------------------------------------------------------------------------------------- ray


def init_ray(address: str | None) -> None:
    """Join ``address`` (or ``RAY_ADDRESS``) or start an embedded local Ray on 127.0.0.1."""
    import ray

    if ray.is_initialized():
        return
    # Worker logs stay in Ray's session folder (/tmp/ray/session_latest/logs) so the terminal shows
    # one progress line per job, not one stream per worker; failures still carry each rank's
    # traceback in the error. AIGC_WORKER_LOGS=1 streams them to the terminal.
    to_driver = os.environ.get("AIGC_WORKER_LOGS", "0") not in ("", "0", "false")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        try:
            ray.init(address=address, log_to_driver=to_driver)
        except ConnectionError as err:
            hint = ""
            if os.environ.get("RAY_AUTH_MODE") != "token":
                # Ray 2.60's `ray start` enables token authentication and writes ~/.ray/auth_token;
                # clients only send it with RAY_AUTH_MODE=token.
                hint = (
                    " If the cluster uses token authentication (the default of `ray start`),"
                    " set RAY_AUTH_MODE=token."
                )
            raise TrainError(f"cannot join the Ray cluster at {address}: {err}.{hint}") from err
        return
    # STACK-NOTES: on Linux Ray binds to the interface address unless told it is a laptop-style
    # single-node cluster; this keeps the embedded cluster on loopback.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    # address="local": always a new embedded instance, never a cluster that `ray start` left behind.
    ray.init(address="local", include_dashboard=False, log_to_driver=to_driver, configure_logging=False)


def _sample_prompts(location: str, n: int = 8) -> list[str]:
    """The first ``n`` distinct val captions: the prompts of every sample grid of the run."""
    from aigc.data.captions_io import read_captions

    prompts: list[str] = []
    for caption in read_captions(location, "val"):
        if caption not in prompts:
            prompts.append(caption)
        if len(prompts) == n:
            break
    return prompts or [""]


# ------------------------------------------------------------------------------------- train


def train(
    config: str | Path | RunConfig | None,
    overrides: list[str] | None = None,
    *,
    workers: int | None = None,
    gpus_per_worker: float | None = None,
    ray_address: str | None = None,
    name: str | None = None,
    resume: str | None = None,
    metrics_out: str | Path | None = None,
    evaluate: bool = True,
    eval_samples: int = 500,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Run one training job end to end and return its summary. See the module docstring."""
    from aigc import tracking
    from aigc.data.captions_io import read_captions
    from aigc.models.text import Tokenizer

    t0 = time.perf_counter()
    driver_t0 = time.time()
    root = project_root()
    if name and resume:
        raise TrainError("--name and --resume exclude each other: --resume NAME continues run NAME")
    cfg = resolve_config(config, overrides, workers, gpus_per_worker, ray_address)
    storage = _storage(cfg, root)

    job: dict[str, Any] | None = None
    if resume:
        job = _read_job(storage, resume)
        if job is None:
            raise TrainError(f"nothing to resume: no run {resume!r} under {storage}")
        # The resumed job keeps its own config (the checkpoint was written with it).
        cfg = resolve_config(
            RunConfig.model_validate(job["run"]), overrides, workers, gpus_per_worker, ray_address
        )
        name = resume
    else:
        name = name or f"{cfg.model.family}-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S-%f')}"
        if not _NAME_RE.match(name):
            raise TrainError(f"run name {name!r}: use letters, digits, '.', '_' and '-' (max 128)")
        if _run_exists(storage, name):
            raise TrainError(
                f"a run named {name!r} already exists under {storage}; "
                f"use `aigc train --resume {name}` to continue it, or choose another --name"
            )

    # After the resume block: a resumed job streams the data its saved config names.
    location = data_location(cfg, root)
    manifest = _read_manifest(location)
    tracking_uri = tracking.resolve_tracking_uri(cfg.tracking.uri)
    tracking.ensure_tracking_store(tracking_uri)  # fails within ~10 s; initialises sqlite once

    from aigc.data.version import version as data_version

    dversion = data_version(location) if "://" not in location else manifest.get("digest", "")
    if job is None:
        from mlflow.tracking import MlflowClient

        tokenizer = Tokenizer.build(read_captions(location, "train"))
        data_name = manifest.get("name", cfg.data.name)
        run_id = tracking.start_job_run(
            tracking_uri,
            cfg.tracking.experiment,
            run_name=cfg.tracking.run_name or name,
            params=cfg.model_dump(mode="json"),
            tags=tracking.lineage_tags(
                family=cfg.model.family,
                data_name=data_name,
                data_version=dversion,
                workers=cfg.scaling.num_workers,
                git_sha=tracking.git_sha(root),
            )
            | {"aigc.run.name": name, "aigc.storage": f"{storage}/{name}"},
        )
        client = MlflowClient(tracking_uri)
        try:
            tracking.log_dataset_input(client, run_id, name=data_name, source=location, digest=dversion)
            experiment_id = client.get_run(run_id).info.experiment_id
            job = {
                "name": name,
                "run_id": run_id,
                "experiment_id": experiment_id,
                "tracking_uri": tracking_uri,
                "run": cfg.model_dump(mode="json"),
                "tokenizer": tokenizer.to_dict(),
                "image_size": manifest["image_size"],
                "channels": manifest["channels"],
            }
            _write_job(storage, name, job)
        except BaseException as err:
            tracking.end_job_run(
                tracking_uri,
                run_id,
                "FAILED" if isinstance(err, Exception) else "KILLED",
                f"{type(err).__name__}: {err}",
            )
            raise
    else:
        tracking_uri = job.get("tracking_uri", tracking_uri)
        run_id = job["run_id"]
        tracking.reopen_job_run(tracking_uri, run_id)

    run_dir = f"{storage}/{name}"
    worker_config = {
        "run": cfg.model_dump(mode="json"),
        "tokenizer": job["tokenizer"],
        "image_size": job["image_size"],
        "channels": job["channels"],
        "data_location": location,
        "tracking_uri": tracking_uri,
        "run_id": run_id,
        "run_dir": run_dir,
        "sample_prompts": _sample_prompts(location),
        "driver_t0": driver_t0,
    }

    with tracking.guard_run(tracking_uri, run_id):
        result = _fit(cfg, name, storage, worker_config, progress)
        checkpoint = _checkpoint_path(result)
        out = TrainResult(
            name=name,
            run_id=run_id,
            experiment_id=job["experiment_id"],
            tracking_uri=tracking_uri,
            status="FINISHED",
            global_step=int((result.metrics or {}).get("step", 0)),
            checkpoint=checkpoint,
            run_dir=run_dir,
            metrics={
                k: float(v)
                for k, v in (result.metrics or {}).items()
                if isinstance(v, (int, float)) and k not in ("step", "epoch")
            },
        )
        if checkpoint:
            _finish(out, cfg, location, worker_config, evaluate, eval_samples)
    out.seconds = time.perf_counter() - t0
    if metrics_out:
        Path(metrics_out).parent.mkdir(parents=True, exist_ok=True)
        Path(metrics_out).write_text(
            json.dumps({**out.eval, "run_id": run_id, "step": out.global_step}, indent=2, sort_keys=True)
        )
    return out


def _fit(cfg: RunConfig, name: str, storage: str, worker_config: dict[str, Any], progress):
    import ray.train
    from ray.train.torch import TorchTrainer

    from aigc.training.progress import ProgressPoller
    from aigc.training.worker import train_loop

    t_ray = time.time()
    init_ray(cfg.scaling.ray_address)
    ray_s = time.time() - t_ray
    sc = cfg.scaling
    resources = {"CPU": sc.cpus_per_worker}
    if sc.use_gpu:
        resources["GPU"] = sc.gpus_per_worker or 1.0
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=worker_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=sc.num_workers, use_gpu=sc.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=sc.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.trainer.keep_last_checkpoints),
            worker_runtime_env={"env_vars": _worker_env()},
        ),
    )
    poller = ProgressPoller(
        worker_config["tracking_uri"], worker_config["run_id"], cfg.trainer.max_steps, callback=progress
    )
    poller.start()
    _log_startup(worker_config, t_ray, ray_s)
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as err:
        # Ray's message carries each failing rank's traceback snippet: keep it for the user and the
        # MLflow run's aigc.error tag.
        raise TrainError(f"training failed: {err}") from err
    finally:
        poller.stop()
    if result.error is not None:
        raise TrainError(f"training failed: {result.error}") from result.error
    return result


def _log_startup(worker_config: dict[str, Any], t_ray: float, ray_s: float) -> None:
    """Driver-side start-up figures (seconds): process start -> train() call (imports, CLI), train()
    -> Ray start (config, tokenizer, MLflow run), Ray start. Workers add theirs (StartupTimer)."""
    import psutil
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    driver_t0 = worker_config["driver_t0"]
    figures = {
        "startup/imports_s": driver_t0 - psutil.Process().create_time(),
        "startup/prepare_s": t_ray - driver_t0,
        "startup/ray_s": ray_s,
    }
    now = int(time.time() * 1000)
    MlflowClient(worker_config["tracking_uri"]).log_batch(
        worker_config["run_id"], metrics=[Metric(k, v, now, 0) for k, v in figures.items()]
    )


def _worker_env() -> dict[str, str]:
    """Environment the driver passes to workers (fault injection for tests, thread settings)."""
    keys = (
        "AIGC_FAULT_EXIT_AT_STEP",
        "AIGC_RECORD_KEYS_DIR",
        "AIGC_PROJECT_ROOT",
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
        "MLFLOW_HTTP_REQUEST_TIMEOUT",
    )
    return {k: os.environ[k] for k in keys if k in os.environ}


def _checkpoint_path(result) -> str | None:
    ckpt = getattr(result, "checkpoint", None)
    return None if ckpt is None else f"{ckpt.path.rstrip('/')}/checkpoint.ckpt"


def _finish(
    out: TrainResult,
    cfg: RunConfig,
    location: str,
    worker_config: dict[str, Any],
    evaluate: bool,
    eval_samples: int,
) -> None:
    """Load the final checkpoint, write the sample grid, evaluate and log eval/* to the run."""
    import tempfile

    import fsspec

    from aigc.models.export import load_checkpoint
    from aigc.training.grid import image_grid

    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "checkpoint.ckpt"
        with fsspec.open(out.checkpoint, "rb") as src, open(local, "wb") as dst:
            dst.write(src.read())
        module = load_checkpoint(local)
    prompts = worker_config["sample_prompts"]
    grid = image_grid(module.generate(prompts, num_samples=8, seed=0), nrow=8)
    if "://" in out.run_dir:
        grid_path = Path(tempfile.mkdtemp()) / f"{out.name}-samples.png"
    else:
        grid_path = Path(out.run_dir) / "samples-final.png"
    grid.save(grid_path)
    out.sample_grid = str(grid_path)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(out.tracking_uri)
    client.log_artifact(out.run_id, str(grid_path))
    if evaluate and "://" not in location:
        from aigc.evaluation import evaluate_model, reference_evaluator

        evaluator = reference_evaluator(location)
        report = evaluate_model(module, evaluator, location, num_samples=eval_samples, seed=cfg.trainer.seed)
        out.eval = report
        figures = {
            k: float(v) for k, v in report.items() if k.startswith("eval/") and isinstance(v, (int, float))
        }
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        client.log_batch(out.run_id, metrics=[Metric(k, v, now, out.global_step) for k, v in figures.items()])
        # Provenance: figures are comparable only when these match (DESIGN §3).
        for k in ("evaluator_hash", "data_version", "num_samples", "seed"):
            if k in report:
                client.set_tag(out.run_id, f"aigc.eval.{k}", str(report[k]))

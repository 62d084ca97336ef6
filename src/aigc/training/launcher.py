"""The driver side of ``aigc train``: one training job from the command line to MLflow.

    resolve the config -> read the dataset's manifest -> check the shards against it and the
      storage path -> [a child process opens the MLflow run, the store checked first] -> build the
      tokenizer -> [Ray starts on a thread] -> take the run (or reopen it on --resume), and inside
      its lifecycle: build the job record -> write aigc-job.json -> wait for Ray -> Ray Train fit
      -> final evaluation -> the run's description

Order matters. The config is validated, the manifest read, every shard's size compared with it and
the storage path written to before Ray starts, and the tracking store reached (and, for sqlite, its
schema migrated: two ranks opening a fresh sqlite store race on the migration with "duplicate column
name") before the run is opened, so a bad config, a missing dataset, shards changed since their
manifest (the run's data version would describe data it did not see) or an unreachable server fail
in seconds and leave no run behind. Ray's start (seconds, mostly waiting for its processes) runs on
a thread (:class:`~aigc.cluster.RayStart`) and the MLflow run is opened by a child process
(:class:`~aigc.tracking.opener.RunOpener`), both beside the driver's own preparation: this process
imports MLflow only once ``trainer.fit()`` has been called. ``startup/*`` metrics record each phase
(:class:`StartupClock`). Everything after the run is opened runs inside one lifecycle
(``tracking.guard_run`` / ``tracking.resumed_job_run``; a tokenizer that fails while the child opens
the run ends it too): any failure ends the run FAILED with the ``aigc.error`` tag, an interrupt
KILLED, never RUNNING.

One MLflow run per job, opened here; workers get its id in the :class:`TrainJob` and only rank 0
logs to it. The config, data check, job file and naming rules live in :mod:`aigc.training.job`, Ray
start-up in :mod:`aigc.cluster`, the Trainer in :mod:`aigc.training.trainer`, the final
evaluation in :mod:`aigc.evaluation.final`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from aigc import project_root
from aigc.config import RunConfig
from aigc.contract import FINAL_GRID, TAG_RUN_NAME, TAG_STORAGE
from aigc.cluster import ClusterError, RayStart, worker_env
from aigc.training.job import (
    TrainError,
    TrainJob,
    absolute,
    check_data,
    check_storage,
    new_run_name,
    read_job,
    resolve_config,
    run_exists,
    sample_prompts,
    storage_location,
    write_job,
)

log = logging.getLogger("aigc.training")

__all__ = ["TrainError", "TrainResult", "data_location", "train"]


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
    registered: str | None = None  # "aigc-<family>/<version>" when the run was registered
    seconds: float = 0.0
    # Data the run did not see as its version describes it: the train samples the loader skipped
    # (most in one epoch, summed over ranks, and that as a fraction of the split), the shards that
    # lost the most ("name (count), ..."), and the shards that differed from the manifest at start
    # (trained on with --allow-modified-data).
    bad_samples: int = 0
    bad_fraction: float = 0.0
    bad_shards: str | None = None
    data_modified: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def data_location(cfg: RunConfig, root: Path) -> str:
    """The shard folder the job streams: ``data.location``, else ``<data.root>/<data.name>``."""
    return absolute(cfg.data.location or str(Path(cfg.data.root) / cfg.data.name), root)


def _dataset_manifest(location: str) -> dict[str, Any]:
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


def _check_latent_data(cfg: RunConfig, location: str, manifest: dict[str, Any]) -> None:
    """A latent dataset (``aigc data encode``) is refused, before anything starts, for a family that
    cannot learn on its kind of latents; a malformed latent section names the dataset."""
    from aigc.data.latents import latent_spec
    from aigc.data.manifest import DatasetError
    from aigc.models import module_class

    try:
        kind = latent_spec(manifest)["kind"]
    except DatasetError as err:
        raise TrainError(str(err)) from None
    allowed = module_class(cfg.model.family).latent_kinds
    if kind not in allowed:
        raise TrainError(
            f"{location} holds {kind} latents (aigc data encode); model.family "
            f"{cfg.model.family!r} learns on {', '.join(allowed) or 'images only'}: use diffusion on KL "
            "latents or autoregressive on VQ codes, or train on the image dataset"
        )


def _stderr(message: str) -> None:
    sys.stderr.write(f"{message}\n")
    sys.stderr.flush()


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
    register: bool = True,
    allow_modified_data: bool = False,
    verify_data: bool = False,
    progress: Callable[[dict[str, Any]], None] | None = None,
    messages: Callable[[str], None] | None = _stderr,
) -> TrainResult:
    """Run one training job end to end and return its summary. See the module docstring.

    Every shard's size is checked against the manifest first, every shard re-hashed with
    ``verify_data`` (:func:`check_data`); a difference fails the job before anything starts unless
    ``allow_modified_data`` (kept in the job record, so a resume keeps it), which tags the run
    ``aigc.data.modified``.

    ``progress`` receives the step dicts of :class:`~aigc.training.progress.ProgressPoller` (default:
    one line on stderr); ``messages`` the lines of the long steps after training (evaluator training,
    evaluation), default stderr, None for silence. With ``register`` the finished run's final
    checkpoint becomes the ``candidate`` version of ``aigc-<family>`` (``aigc.registry``); a failed
    registration raises ``TrainError`` after the run is recorded FINISHED.
    """
    from aigc import tracking
    from aigc.data.version import version

    t0 = time.perf_counter()
    launched_at = time.time()
    clock = StartupClock()
    say = messages or (lambda _m: None)
    root = project_root()
    if name and resume:
        raise TrainError("--name and --resume exclude each other: --resume NAME continues run NAME")
    cfg = resolve_config(config, overrides, workers, gpus_per_worker, ray_address)
    storage = storage_location(cfg, root)
    clock.mark("config")

    saved: TrainJob | None = None
    if resume:
        saved = read_job(storage, resume)
        # The resumed job keeps its own config (its checkpoints were written with it), with the
        # options given now applied on top; the job file is rewritten with the result.
        cfg = resolve_config(saved.run, overrides, workers, gpus_per_worker, ray_address)
        name = resume
    else:
        name = new_run_name(cfg, name)
        if run_exists(storage, name):
            raise TrainError(
                f"a run named {name!r} already exists under {storage}; "
                f"use `aigc train --resume {name}` to continue it, or choose another --name"
            )

    # A resumed job streams the data its saved config names, resolved when it was first launched.
    same_data = saved is not None and cfg.data == saved.run.data
    location = saved.data_location if same_data else data_location(cfg, root)
    manifest = _dataset_manifest(location)
    clock.mark("manifest")
    if manifest.get("latent") is not None:
        _check_latent_data(cfg, location, manifest)
    # Once allowed, a job keeps training on the data as it is: its first part already did.
    allow_modified_data = allow_modified_data or (saved is not None and saved.allow_modified_data)
    modified = check_data(
        location, manifest, verify=verify_data, allow=allow_modified_data, resuming=saved is not None
    )
    if modified:
        say(
            f"warning: training on shards that differ from the manifest (--allow-modified-data): "
            f"{'; '.join(modified)}; the run is tagged {tracking.TAG_DATA_MODIFIED}"
        )
    if saved is None:
        check_storage(storage)  # a storage path the job cannot write fails before the run opens
    clock.mark("data_check")
    # A resumed job's run lives in the store its job file names, whatever the environment says now.
    tracking_uri = saved.tracking_uri if saved else tracking.resolve_tracking_uri(cfg.tracking.uri)
    dversion = saved.data_version if same_data else version(location)
    clock.mark("data_version")
    run_dir = f"{storage}/{name}"
    data_name = manifest.get("name", cfg.data.name)
    modified_tags = tracking.data_modified_tags(modified)

    def description(**done: Any) -> str:
        return tracking.run_description(
            cfg.model.family,
            max_steps=cfg.trainer.max_steps,
            workers=cfg.scaling.num_workers,
            data=f"`{data_name}` version `{dversion}`" + (" (modified, see the tags)" if modified else ""),
            **done,
        )

    # The git sha, the run's child process, the tokenizer and then Ray's thread, in this order: while
    # that thread loads torch's libraries this one waits up to ~2 s for each turn on the interpreter
    # (`git` took 2 s then, 0.006 s before it; the tokenizer 2 s, 0.15 s before it).
    opener = None
    if saved is None:
        sha = tracking.git_sha(root)
        clock.mark("git")
        # The run is opened by a child process (the store checked first: a dead server fails within
        # ~10 s), beside Ray's start and the tokenizer here: importing MLflow in this process would
        # take turns on one core with Ray's import of torch (aigc.tracking.opener).
        opener = tracking.RunOpener(
            tracking_uri,
            cfg.tracking.experiment,
            run_name=cfg.tracking.run_name or name,
            params=cfg.model_dump(mode="json"),
            tags=tracking.lineage_tags(
                family=cfg.model.family,
                data_name=data_name,
                data_version=dversion,
                workers=cfg.scaling.num_workers,
                git_sha=sha,
                registered_model=cfg.tracking.model_name(cfg.model.family),
            )
            | tracking.source_tags(tracking.command_line(), sha)
            | modified_tags
            | {TAG_RUN_NAME: name, TAG_STORAGE: run_dir, tracking.TAG_RUN_NOTE: description()},
            dataset={"name": data_name, "source": location, "digest": dversion},
        )
        clock.mark("mlflow_run")
    ray_start: RayStart | None = None
    try:
        if opener is not None:
            from aigc.data.captions_io import read_captions
            from aigc.models.tokenizer import Tokenizer  # not models.text: that imports torch

            try:
                # Also before Ray's thread: 0.15 s alone, 2 s while that thread loads torch.
                tokenizer = Tokenizer.build(read_captions(location, "train")).to_dict()
                clock.mark("tokenizer")
                # The inputs are checked: Ray starts on a thread while the child opens the run.
                ray_start = RayStart(cfg.scaling.ray_address)
                opened = opener.result()  # raises what the child raised (TrackingUnavailable, ...)
                clock.mark("tracking_wait")
            except BaseException as err:
                opener.abandon(err)  # a run the child opened ends FAILED with this error
                raise
            lifecycle = tracking.guard_run(tracking_uri, opened.run_id)
        else:
            ray_start = RayStart(cfg.scaling.ray_address)
            # The resumed run is reopened here (a dead server fails within ~10 s), beside Ray's start.
            lifecycle = tracking.resumed_job_run(tracking_uri, saved.run_id)
            clock.mark("mlflow_run")
            tokenizer = saved.tokenizer
            opened = None

        with lifecycle as resumed:
            run = opened or resumed
            if saved is not None and modified_tags:
                from mlflow.tracking import MlflowClient

                for key, value in modified_tags.items():
                    MlflowClient(tracking_uri).set_tag(run.run_id, key, value)
            job = TrainJob(
                name=name,
                run_id=run.run_id,
                experiment_id=run.experiment_id,
                tracking_uri=tracking_uri,
                run=cfg,
                tokenizer=tokenizer,
                image_size=manifest["image_size"],
                channels=manifest["channels"],
                latent=manifest.get("latent"),
                data_location=location,
                data_version=dversion,
                run_dir=run_dir,
                sample_prompts=sample_prompts(location),
                launched_at=launched_at,
                allow_modified_data=allow_modified_data,
            )
            write_job(job)
            clock.mark("job_file")
            assert ray_start is not None  # started above on both paths
            result = _fit(job, progress, ray_start, clock)
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri)
            checkpoint = _checkpoint_path(result, run_dir)
            out = TrainResult(
                name=name,
                run_id=run.run_id,
                experiment_id=run.experiment_id,
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
                data_modified=modified,
            )
            out.bad_samples, out.bad_fraction, out.bad_shards = tracking.skipped_samples(client, run.run_id)
            if out.bad_samples:
                say(f"warning: {bad_samples_line(out, cfg.data.max_bad_fraction)}")
            if checkpoint:
                out.sample_grid = _final_grid(run_dir)
                if evaluate:
                    out.eval = _final_evaluation(job, out, eval_samples, say)
            notes = [f"Data: {bad_samples_line(out, cfg.data.max_bad_fraction)}"] if out.bad_samples else []
            if modified:
                notes.append(f"Data: shards differed from the manifest: {'; '.join(modified)}")
            client.set_tag(
                run.run_id,
                tracking.TAG_RUN_NOTE,
                description(
                    steps=out.global_step,
                    eval_figures=out.eval,
                    sample_grid=FINAL_GRID if out.sample_grid else None,
                    notes=notes,
                ),
            )
    finally:
        if ray_start is not None:
            ray_start.join()  # a job that failed before Ray was up leaves no thread starting it

    if register and out.checkpoint:
        out.registered = _register(out, say)
    out.seconds = time.perf_counter() - t0
    if metrics_out:
        Path(metrics_out).parent.mkdir(parents=True, exist_ok=True)
        # What DVC compares across experiments (`dvc metrics diff`, `dvc exp show`): the numeric
        # figures and the guards; their provenance stays in the run's aigc.eval.* tags.
        from aigc.contract import GUARDS, eval_figures

        record = {"run_id": out.run_id, "step": out.global_step, **eval_figures(out.eval)}
        record.update({g: out.eval[g] for g in GUARDS if g in out.eval})
        Path(metrics_out).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return out


def bad_samples_line(out: TrainResult, max_bad_fraction: float) -> str:
    """One line on the samples the loader skipped, for the terminal and the run's description."""
    return (
        f"the loader skipped {out.bad_samples} unreadable train samples in an epoch "
        f"({out.bad_fraction:.2%} of the split, under data.max_bad_fraction {max_bad_fraction}); "
        f"worst shards: {out.bad_shards or 'unknown'}"
    )


class StartupClock:
    """Seconds of the driver's own start-up phases, in order (``startup/prepare.<phase>_s``).

    ``mark(phase)`` closes the phase that began at the previous mark. The figures separate what aigc
    does before training (config, manifest, data check, tracking store, MLflow run, tokenizer, job
    file) from Ray's start, which runs beside them on a thread (:class:`RayStart`).
    """

    def __init__(self) -> None:
        self._t = time.perf_counter()
        self.phases: dict[str, float] = {}

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        self.phases[phase] = self.phases.get(phase, 0.0) + now - self._t
        self._t = now


def _fit(
    job: TrainJob,
    progress: Callable[[dict[str, Any]], None] | None,
    ray_start: RayStart,
    clock: StartupClock,
):
    """Ray Train over ``job.run.scaling.num_workers`` workers; its checkpoints under ``job.run_dir``."""
    try:
        ray_wait = ray_start.wait()  # Ray was started on a thread while the driver prepared the job
    except ClusterError as err:
        raise TrainError(str(err)) from None
    clock.mark("ray_wait")
    import ray.train
    from ray.train.torch import TorchTrainer

    from aigc.training.progress import ProgressPoller
    from aigc.training.worker import train_loop

    cfg = job.run
    sc = cfg.scaling
    resources = {"CPU": sc.cpus_per_worker}
    if sc.use_gpu:
        resources["GPU"] = sc.gpus_per_worker or 1.0
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=job.to_json(),
        scaling_config=ray.train.ScalingConfig(
            num_workers=sc.num_workers, use_gpu=sc.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=job.name,
            storage_path=job.run_dir.rsplit("/", 1)[0],
            failure_config=ray.train.FailureConfig(max_failures=sc.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.trainer.keep_last_checkpoints),
            worker_runtime_env={"env_vars": worker_env()},
        ),
    )
    poller = ProgressPoller(job.tracking_uri, job.run_id, cfg.trainer.max_steps, callback=progress)
    poller.start()
    clock.mark("submit")
    startup = _startup_figures(job, clock, ray_start.seconds, ray_wait)
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as err:
        # Ray's message carries each failing rank's traceback snippet: keep it for the user and the
        # MLflow run's aigc.error tag.
        raise TrainError(f"training failed: {err}") from err
    finally:
        poller.stop()
        # Logged once fit() is done: this process imports MLflow after the workers have started.
        _log_startup(job, startup)
    if result.error is not None:
        raise TrainError(f"training failed: {result.error}") from result.error
    return result


def _startup_figures(job: TrainJob, clock: StartupClock, ray_s: float, ray_wait_s: float) -> dict[str, float]:
    """Driver-side start-up figures in seconds (``benchmarks/cold_start.py`` reads them):

    - ``startup/imports_s``: process start -> the ``train()`` call (interpreter, imports, CLI);
    - ``startup/prepare_s``: the driver's own work in ``train()``, the waits for Ray and for the
      MLflow run left out, and ``startup/prepare.<phase>_s`` for each phase of :class:`StartupClock`
      (``mlflow_run`` is starting the child that opens the run, or reopening a resumed run);
    - ``startup/ray_s``: starting (or joining) Ray and importing Ray Train, on the thread;
      ``startup/ray_wait_s``: what of it the driver still waited for after its preparation;
    - ``startup/tracking_wait_s``: what the driver waited for the child opening the MLflow run
      (:class:`~aigc.tracking.opener.RunOpener`) after building the tokenizer;
    - ``startup/fit_call_s``: ``train()`` -> ``trainer.fit()``.

    Rank 0 adds when its worker loop, first batch and first step came (``StartupTimer``)."""
    import psutil

    waits = ("ray_wait", "tracking_wait")
    own = {k: v for k, v in clock.phases.items() if k not in waits}
    return {
        "startup/imports_s": job.launched_at - psutil.Process().create_time(),
        "startup/prepare_s": sum(own.values()),
        "startup/ray_s": ray_s,
        "startup/ray_wait_s": ray_wait_s,
        "startup/tracking_wait_s": clock.phases.get("tracking_wait", 0.0),
        "startup/fit_call_s": time.time() - job.launched_at,
    } | {f"startup/prepare.{k}_s": v for k, v in own.items()}


def _log_startup(job: TrainJob, figures: dict[str, float]) -> None:
    """Log :func:`_startup_figures` to the run; best effort (the job's own outcome is what counts)."""
    try:
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        now = int(time.time() * 1000)
        MlflowClient(job.tracking_uri).log_batch(
            job.run_id, metrics=[Metric(k, v, now, 0) for k, v in figures.items()]
        )
    except Exception:  # noqa: BLE001 - a store that fails now fails the run's own logging too
        log.warning("could not log the start-up figures of run %s", job.run_id, exc_info=True)


def _checkpoint_path(result, run_dir: str) -> str | None:
    """The final checkpoint's file as a path or URL under ``run_dir``.

    Ray's ``Checkpoint.path`` is a path inside its pyarrow filesystem: for ``s3://bucket/runs`` it
    is ``bucket/runs/<name>/checkpoint-...`` with no scheme, which fsspec would read as a local
    path. The checkpoint folder is a child of the run folder, so its name is joined to ``run_dir``.
    """
    ckpt = getattr(result, "checkpoint", None)
    if ckpt is None:
        return None
    return f"{run_dir.rstrip('/')}/{ckpt.path.rstrip('/').rsplit('/', 1)[-1]}/checkpoint.ckpt"


def _register(out: TrainResult, say: Callable[[str], None]) -> str:
    """Register the finished run (``aigc register``); the run stays FINISHED whatever happens here."""
    from aigc.registry.register import register_run

    try:
        r = register_run(out.run_id, out.tracking_uri, progress=say)
    except Exception as err:  # noqa: BLE001 - reported with the way to retry
        raise TrainError(
            f"run {out.name} ({out.run_id}) FINISHED, but registering it failed: {err}. "
            f"Retry with `aigc register {out.run_id}`."
        ) from err
    return f"{r.name}/{r.version}"


def _final_grid(run_dir: str) -> str | None:
    """Where rank 0 wrote the final sample grid (see ``MlflowMetrics``), if it did."""
    import fsspec

    url = f"{run_dir}/{FINAL_GRID}"
    fs, path = fsspec.core.url_to_fs(url)
    return url if fs.exists(path) else None


def evaluation_threads(job: TrainJob) -> int:
    """The cores the job was given (workers x CPUs per worker), at most this machine's: the final
    evaluation runs after the workers are done, on their share of the machine."""
    sc = job.run.scaling
    return max(1, min(os.cpu_count() or 1, int(sc.num_workers * sc.cpus_per_worker)))


def _final_evaluation(
    job: TrainJob, out: TrainResult, num_samples: int, say: Callable[[str], None]
) -> dict[str, Any]:
    """The final checkpoint through :func:`aigc.evaluation.final.final_evaluation`, logged to the run.

    The checkpoint and the data are read where the job wrote and streamed them: local folders or
    fsspec URLs (``s3://...``) alike."""
    from aigc.evaluation.final import final_evaluation, load_model_from, log_evaluation

    threads = evaluation_threads(job)
    say(f"final evaluation of step {out.global_step} on {threads} thread(s)")
    report = final_evaluation(
        load_model_from(out.checkpoint),
        job.data_location,
        num_samples=num_samples,
        seed=job.run.trainer.seed,
        threads=threads,
        progress=say,
    )
    log_evaluation(job.tracking_uri, job.run_id, report, step=out.global_step)
    return report

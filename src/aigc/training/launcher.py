"""The driver side of ``aigc train``: one training job, from a :class:`TrainRequest` to its MLflow run.

:func:`train` reads as its steps. What can fail without a run (the config, the run name, the
manifest and every shard's size against it, the storage path) is checked first, so a bad request
fails in seconds and leaves no run behind. Start-up then overlaps: a child process checks the
tracking store (a fresh sqlite store is migrated there once: two ranks opening it race on the
migration) and opens the run (:class:`~aigc.tracking.opener.RunOpener`), while this process builds
the tokenizer and Ray starts on a thread (:class:`~aigc.cluster.RayStart`); this process imports
MLflow only once ``trainer.fit()`` has been called. ``startup/*`` metrics time each phase
(:class:`StartupClock`). From the run's opening on, the job runs inside its lifecycle
(``tracking.guard_run`` / ``tracking.resumed_job_run``): any failure ends the run FAILED with the
``aigc.error`` tag, an interrupt KILLED, never RUNNING.

One MLflow run per job; workers get its id in the :class:`TrainJob` and only rank 0 logs to it.
Registering the finished run is :func:`aigc.workflows.train.train_and_register`'s, above this package.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aigc import project_root
from aigc.cluster import ClusterError, RayStart, worker_runtime_env
from aigc.config import RunConfig
from aigc.contract import (
    EXPORT_FILES,
    FINAL_GRID,
    GUARDS,
    INIT_DIR,
    INIT_SOURCE_FILE,
    INIT_TAG_FIELDS,
    STEP_FILE,
    TAG_CHECKPOINT_STEP,
    TAG_DATA_MODIFIED,
    TAG_RUN_NAME,
    TAG_STORAGE,
    eval_figures,
    is_eval_key,
)
from aigc.models.init import InitSource
from aigc.training.job import (
    TrainError,
    TrainJob,
    check_data,
    check_latent_data,
    check_storage,
    data_location,
    dataset_manifest,
    final_checkpoint,
    new_run_name,
    read_job,
    run_exists,
    sample_prompts,
    storage_location,
    write_job,
)
from aigc.training.request import TrainRequest

if TYPE_CHECKING:
    from aigc.tracking.lifecycle import JobRun

log = logging.getLogger("aigc.training")

__all__ = ["TrainError", "TrainRequest", "TrainResult", "to_stderr", "train", "write_metrics"]

Progress = Callable[[dict[str, Any]], None]
Messages = Callable[[str], None]
#: ``(ref, tracking_uri, scratch folder, messages) -> InitSource``: ``--init-from REF`` as an export folder
InitResolver = Callable[[str, str, Path, Messages], InitSource]


@dataclass
class TrainResult:
    name: str
    run_id: str
    experiment_id: str
    tracking_uri: str
    status: str
    global_step: int
    checkpoint: str | None  # the run's model: the best evaluated checkpoint, else the last
    run_dir: str
    metrics: dict[str, float] = field(default_factory=dict)
    eval: dict[str, Any] = field(default_factory=dict)
    sample_grid: str | None = None
    # "aigc-<family>/<version>" once registered (aigc.workflows.train.train_and_register)
    registered: str | None = None
    seconds: float = 0.0
    # Data the run did not see as its version describes it: the train samples the loader skipped
    # (most in one epoch, summed over ranks, and that as a fraction of the split), the shards that
    # lost the most ("name (count), ..."), and the shards that differed from the manifest at start
    # (trained on with --allow-modified-data).
    bad_samples: int = 0
    bad_fraction: float = 0.0
    bad_shards: str | None = None
    data_modified: list[str] = field(default_factory=list)
    # The step of ``checkpoint`` (tag aigc.checkpoint.step): below global_step when the run
    # evaluated during training and an earlier checkpoint measured best.
    checkpoint_step: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def to_stderr(message: str) -> None:
    sys.stderr.write(f"{message}\n")
    sys.stderr.flush()


def _silent(_message: str) -> None:
    pass


def train(
    request: TrainRequest | str | Path | RunConfig | None = None,
    overrides: list[str] | None = None,
    *,
    progress: Progress | None = None,
    messages: Messages | None = to_stderr,
    resolve_init: InitResolver | None = None,
    **options: Any,
) -> TrainResult:
    """Run one training job end to end and return its summary. It is not registered: that is
    :func:`aigc.workflows.train.train_and_register`, what ``aigc train`` runs.

    ``request`` is a :class:`TrainRequest`, or its ``config`` with ``overrides`` and the other fields
    as keywords (``train("models/vae.yaml", ["trainer.max_steps=5"], name="v1")``). ``progress``
    receives the step dicts of :class:`~aigc.training.progress.ProgressPoller` (default: one line on
    stderr); ``messages`` the warnings and the lines of the final evaluation, default stderr, None
    for silence. ``resolve_init`` turns ``request.init_from`` into an export folder
    (:class:`~aigc.models.init.InitSource`); without it only an export folder is understood
    (:func:`aigc.workflows.train.resolve_init` knows registered versions and runs as well).
    """
    request = TrainRequest.of(request, overrides, **options)
    t0 = time.perf_counter()
    say = messages or _silent
    with tempfile.TemporaryDirectory(prefix="aigc-init-from-") as tmp:  # a source exported for the job
        if request.resume:
            prep = _prepare_resume(request, say)
        else:
            prep = _prepare(request, say, resolve_init, Path(tmp))
        with _start(prep) as started:  # the run open and Ray starting; from here a failure ends the run
            job = _write_job(prep, started)
            result = _fit(job, progress, started.ray, prep.clock, say)
            out = _finish(prep, job, result, say)
    out.seconds = time.perf_counter() - t0
    if request.metrics_out:
        write_metrics(request.metrics_out, out)
    return out


# --------------------------------------------------------------------------------- prepare


@dataclass
class _Prepared:
    """A job resolved and checked, before anything has started."""

    request: TrainRequest  # on --resume, continued from the job record
    cfg: RunConfig
    name: str
    run_dir: str
    location: str  # the shard folder or URL the job streams
    manifest: dict[str, Any]
    data_version: str
    modified: list[str]  # shards that differ from the manifest (allowed), one line each
    tracking_uri: str
    clock: StartupClock
    launched_at: float  # time.time() of this launch's train() call
    saved: TrainJob | None = None  # the job record --resume continues
    init: InitSource | None = None  # --init-from, resolved to an export folder
    tokenizer: dict[str, Any] | None = None  # --init-from: the source's, extended by the captions

    @property
    def data_name(self) -> str:
        return self.manifest.get("name", self.cfg.data.name)

    def description(self, **done: Any) -> str:
        """The run's description (``mlflow.note.content``): the plan, and what was ``done`` at the end."""
        from aigc import tracking

        modified = " (modified, see the tags)" if self.modified else ""
        return tracking.run_description(
            self.cfg.model.family,
            max_steps=self.cfg.trainer.max_steps,
            workers=_workers_text(self.cfg.scaling),
            data=f"`{self.data_name}` version `{self.data_version}`{modified}",
            **done,
        )


def _prepare(
    request: TrainRequest, say: Messages, resolve_init: InitResolver | None = None, tmp: Path | None = None
) -> _Prepared:
    """A new job: the config resolved, the run name free, the data checked against its manifest, the
    storage path written to. A bad request fails here, with no MLflow run created, Ray not started."""
    from aigc import tracking
    from aigc.data.version import version

    clock, launched_at = StartupClock(), time.time()
    root = project_root()
    cfg = request.run_config()
    storage = storage_location(cfg, root)
    clock.mark("config")
    name = new_run_name(cfg, request.name)
    if run_exists(storage, name):
        raise TrainError(
            f"a run named {name!r} already exists under {storage}; "
            f"use `aigc train --resume {name}` to continue it, or choose another --name"
        )
    location = data_location(cfg, root)
    manifest, modified = _check_dataset(request, cfg, location, clock, say)
    check_storage(storage)
    clock.mark("data_check")
    tracking_uri = tracking.resolve_tracking_uri(cfg.tracking.uri)
    data_version = version(location)
    clock.mark("data_version")
    init = tokenizer = None
    if getattr(cfg.model, "lora", None) is not None and not request.init_from and _lora_needs_base(cfg):
        raise TrainError(
            "model.lora trains LoRA adapters on a base model: give it with --init-from REF (a registered "
            "version such as aigc-diffusion@production, a run, or an export folder)"
        )
    if request.init_from:
        init, tokenizer = _prepare_init(
            request.init_from,
            resolve_init,
            cfg,
            location,
            manifest,
            tracking_uri,
            tmp or Path(tempfile.mkdtemp()),
            say,
        )
        clock.mark("init_from")
    return _Prepared(
        request=request,
        cfg=cfg,
        name=name,
        run_dir=f"{storage}/{name}",
        location=location,
        manifest=manifest,
        data_version=data_version,
        modified=modified,
        tracking_uri=tracking_uri,
        clock=clock,
        launched_at=launched_at,
        init=init,
        tokenizer=tokenizer,
    )


def _lora_needs_base(cfg: RunConfig) -> bool:
    """Whether this config's family takes its LoRA base from ``--init-from`` (aigc's own families; the
    sd family's base is the pipeline folder its config names)."""
    from aigc.models import module_class

    return bool(module_class(cfg.model.family).lora_targets)


def _prepare_init(
    ref: str,
    resolve_init: InitResolver | None,
    cfg: RunConfig,
    location: str,
    manifest: dict[str, Any],
    tracking_uri: str,
    tmp: Path,
    say: Messages,
) -> tuple[InitSource, dict[str, Any]]:
    """``--init-from REF`` resolved to an export folder, checked against the model this config builds
    (every tensor that does not fit is named, with the config keys that differ from the source's),
    and the tokenizer the job trains with: the source's, extended by the train captions' new words."""
    from aigc.data.captions_io import read_captions
    from aigc.models import build_module
    from aigc.models.init import (
        InitError,
        differing_keys,
        export_source,
        init_state,
        read_config,
        read_tokenizer,
        read_weights,
    )

    try:
        source = resolve_init(ref, tracking_uri, tmp, say) if resolve_init else export_source(ref)
        config = read_config(source.path)
        if config.get("base"):
            raise InitError(f"--init-from {source.label}: a LoRA adapter; start from its base model instead")
        known = read_tokenizer(source.path)
        tokenizer = known.extend(read_captions(location, "train"))
        module = build_module(
            cfg, tokenizer, manifest["image_size"], manifest["channels"], manifest.get("latent")
        )
        init_state(module, read_weights(source.path), config, source.label)
    except InitError as err:
        raise TrainError(str(err)) from None
    # Keys that size no tensor still change what the weights mean (timesteps, prediction, ...).
    changed = [f"{k}: {a!r} -> {b!r}" for k, a, b in differing_keys(config, module)]
    say(
        f"starting from {source.label}: its weights and tokenizer ({len(known)} tokens, "
        f"{len(tokenizer) - len(known)} new from this data)"
        + (f"; config keys changed from the source's: {', '.join(changed)}" if changed else "")
    )
    return source, tokenizer.to_dict()


def _prepare_resume(request: TrainRequest, say: Messages) -> _Prepared:
    """``--resume NAME``: run NAME's job record, continued (:meth:`TrainRequest.continuing`), its data
    checked again. The run stays in the store the record names, whatever the environment says now;
    while the data config is unchanged the job streams the data its first launch resolved."""
    from aigc.data.version import version

    clock, launched_at = StartupClock(), time.time()
    root = project_root()
    # The storage path comes from the options given now: the record is found through it.
    storage = storage_location(request.run_config(), root)
    clock.mark("config")
    name = request.resume
    assert name is not None
    saved = read_job(storage, name)
    request = request.continuing(saved)
    cfg = request.run_config()
    same_data = cfg.data == saved.run.data
    location = saved.data_location if same_data else data_location(cfg, root)
    manifest, modified = _check_dataset(request, cfg, location, clock, say)
    clock.mark("data_check")
    data_version = saved.data_version if same_data else version(location)
    clock.mark("data_version")
    return _Prepared(
        request=request,
        cfg=cfg,
        name=name,
        run_dir=f"{storage}/{name}",
        location=location,
        manifest=manifest,
        data_version=data_version,
        modified=modified,
        tracking_uri=saved.tracking_uri,
        clock=clock,
        launched_at=launched_at,
        saved=saved,
    )


def _check_dataset(
    request: TrainRequest, cfg: RunConfig, location: str, clock: StartupClock, say: Messages
) -> tuple[dict[str, Any], list[str]]:
    """The dataset's manifest, and the shards that differ from it (:func:`check_data`: a
    ``TrainError`` unless ``allow_modified_data``); a latent dataset must suit the family."""
    manifest = dataset_manifest(location)
    clock.mark("manifest")
    check_latent_data(cfg, location, manifest)
    resuming = request.resume is not None
    modified = check_data(
        location, manifest, verify=request.verify_data, allow=request.allow_modified_data, resuming=resuming
    )
    if modified:
        say(
            f"warning: training on shards that differ from the manifest (--allow-modified-data): "
            f"{'; '.join(modified)}; the run is tagged {TAG_DATA_MODIFIED}"
        )
    return manifest, modified


# -------------------------------------------------------------------------------- start-up


@dataclass(frozen=True)
class _Started:
    run: JobRun  # the job's MLflow run, open
    tokenizer: dict[str, Any]  # Tokenizer.to_dict() of the train captions
    ray: RayStart  # Ray starting (or started) on its thread


def _start(prep: _Prepared) -> AbstractContextManager[_Started]:
    """The job's MLflow run opened (or reopened on ``--resume``) while Ray starts on a thread, and
    the block inside the run's lifecycle; Ray's thread is joined on the way out."""
    return _reopen_run(prep) if prep.saved is not None else _open_run(prep)


@contextmanager
def _open_run(prep: _Prepared) -> Iterator[_Started]:
    """A new job's run, opened by a child process while this one builds the tokenizer and starts Ray."""
    from aigc import tracking

    # The git sha, the run's child process, the tokenizer and then Ray's thread, in this order: while
    # that thread loads torch's libraries this one waits up to ~2 s for each turn on the interpreter
    # (`git` took 2 s then, 0.006 s before it; the tokenizer 2 s, 0.15 s before it).
    opener = _run_opener(prep)
    ray_start: RayStart | None = None
    try:
        try:
            tokenizer = prep.tokenizer or _tokenizer(prep.location)
            prep.clock.mark("tokenizer")
            ray_start = RayStart(prep.cfg.scaling.ray_address)
            run = opener.result()  # raises what the child raised (TrackingUnavailable, ...)
            prep.clock.mark("tracking_wait")
        except BaseException as err:
            opener.abandon(err)  # a run the child opened ends FAILED with this error
            raise
        with tracking.guard_run(prep.tracking_uri, run.run_id):
            yield _Started(run, tokenizer, ray_start)
    finally:
        if ray_start is not None:
            ray_start.join()  # a job that failed before Ray was up leaves no thread starting it


@contextmanager
def _reopen_run(prep: _Prepared) -> Iterator[_Started]:
    """``--resume``: the job's own run reopened, beside Ray's start (a dead server fails within
    ~10 s). The tokenizer is the record's: the checkpoints were written with it."""
    from aigc import tracking

    assert prep.saved is not None
    ray_start = RayStart(prep.cfg.scaling.ray_address)
    try:
        with tracking.resumed_job_run(prep.tracking_uri, prep.saved.run_id) as run:
            prep.clock.mark("mlflow_run")
            if prep.modified:
                client = tracking.client_for(prep.tracking_uri)
                for key, value in tracking.data_modified_tags(prep.modified).items():
                    client.set_tag(run.run_id, key, value)
            yield _Started(run, prep.saved.tokenizer, ray_start)
    finally:
        ray_start.join()


def _run_opener(prep: _Prepared):
    """The child process opening a new job's run (:class:`~aigc.tracking.opener.RunOpener`): the
    store checked first, then the run with its params, lineage and source tags, and the dataset.
    Importing MLflow here instead would take turns on one core with Ray's import of torch."""
    from aigc import tracking

    cfg = prep.cfg
    sha = tracking.git_sha(project_root())
    prep.clock.mark("git")
    tags = (
        tracking.lineage_tags(
            family=cfg.model.family,
            data_name=prep.data_name,
            data_version=prep.data_version,
            # An elastic job's tag is its most workers; each attempt's size is in the worker logs.
            workers=cfg.scaling.max_workers,
            git_sha=sha,
            registered_model=cfg.tracking.model_name(cfg.model.family),
        )
        | tracking.source_tags(tracking.command_line(), sha)
        | tracking.data_modified_tags(prep.modified)
        | {TAG_RUN_NAME: prep.name, TAG_STORAGE: prep.run_dir, tracking.TAG_RUN_NOTE: prep.description()}
        | (prep.init.tags if prep.init else {})
    )
    if prep.request.parent_run_id:  # a sweep's trial, nested under the sweep's run in the UI
        from aigc.tracking.context import TAG_PARENT_RUN

        tags[TAG_PARENT_RUN] = prep.request.parent_run_id
    opener = tracking.RunOpener(
        prep.tracking_uri,
        cfg.tracking.experiment,
        run_name=cfg.tracking.run_name or prep.name,
        params=cfg.model_dump(mode="json"),
        tags=tags,
        dataset={"name": prep.data_name, "source": prep.location, "digest": prep.data_version},
    )
    prep.clock.mark("mlflow_run")
    return opener


def _tokenizer(location: str) -> dict[str, Any]:
    """The tokenizer of the train captions, as the job record holds it."""
    from aigc.data.captions_io import read_captions
    from aigc.models.tokenizer import Tokenizer  # not models.text: that imports torch

    return Tokenizer.build(read_captions(location, "train")).to_dict()


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


# ------------------------------------------------------------------------------------- fit


def _write_job(prep: _Prepared, started: _Started) -> TrainJob:
    """The job record, written to the run folder (``--resume`` reads it back) and handed to workers."""
    job = TrainJob(
        name=prep.name,
        run_id=started.run.run_id,
        experiment_id=started.run.experiment_id,
        tracking_uri=prep.tracking_uri,
        run=prep.cfg,
        tokenizer=started.tokenizer,
        image_size=prep.manifest["image_size"],
        channels=prep.manifest["channels"],
        latent=prep.manifest.get("latent"),
        data_location=prep.location,
        data_version=prep.data_version,
        run_dir=prep.run_dir,
        sample_prompts=sample_prompts(prep.location),
        launched_at=prep.launched_at,
        allow_modified_data=prep.request.allow_modified_data,
        resumed=prep.saved is not None,
        eval_samples=prep.cfg.trainer.eval_samples or prep.request.eval_samples,
        init_from=_store_init(prep.init, prep.run_dir) if prep.init else None,
    )
    write_job(job)
    prep.clock.mark("job_file")
    return job


def _store_init(init: InitSource, run_dir: str) -> str:
    """Copy the export a job starts from into its run folder (``INIT_DIR``): every worker, on any
    node, reads it from there, and a resume before the first checkpoint starts from it again."""
    import fsspec

    where = f"{run_dir}/{INIT_DIR}"
    fs, path = fsspec.core.url_to_fs(where)
    fs.makedirs(path, exist_ok=True)
    for name in EXPORT_FILES:
        fs.put_file(str(init.path / name), f"{path}/{name}")
    source = {INIT_TAG_FIELDS[k]: v for k, v in init.tags.items() if k in INIT_TAG_FIELDS}
    with fs.open(f"{path}/{INIT_SOURCE_FILE}", "w") as f:
        f.write(json.dumps(source, indent=2))
    return where


def _checkpoint_config(tc) -> Any:
    """Which checkpoints Ray Train keeps: the newest ``keep_last_checkpoints``; or, for a run that
    evaluates during training, the best ``keep_best_checkpoints`` by ``checkpoint_metric`` plus the
    newest. Ray deletes the others from the storage (local or S3) once their evaluation is in, never
    one still waiting for it (ray 2.60 ``CheckpointManager._save_state_and_delete_old_checkpoints``)."""
    import ray.train

    if not tc.eval_every_steps:
        return ray.train.CheckpointConfig(num_to_keep=tc.keep_last_checkpoints)
    return ray.train.CheckpointConfig(
        num_to_keep=tc.keep_best_checkpoints,
        checkpoint_score_attribute=tc.checkpoint_metric,
        checkpoint_score_order=tc.checkpoint_mode,
    )


def _prepare_evaluator(job: TrainJob, messages: Messages | None) -> None:
    """Before the workers start: the dataset's reference evaluator trained (and cached) here, once,
    rather than by the first evaluation task while the workers wait for its CPUs; and a clear error
    when it cannot report ``trainer.checkpoint_metric`` (``eval/cond_accuracy`` needs labels)."""
    from aigc.data.latents import evaluation_dataset
    from aigc.evaluation.reference import reference_evaluator

    tc = job.run.trainer
    evaluator = reference_evaluator(
        evaluation_dataset(job.data_location), progress=messages, threads=evaluation_threads(job)
    )
    if tc.checkpoint_metric == "eval/cond_accuracy" and evaluator.classifier is None:
        raise TrainError(
            "trainer.checkpoint_metric: eval/cond_accuracy needs a labelled dataset and "
            f"{job.data_location} has no labels; choose eval/fd or eval/clip_score"
        )


def _fit(
    job: TrainJob,
    progress: Progress | None,
    ray_start: RayStart,
    clock: StartupClock,
    messages: Messages | None = None,
) -> Any:
    """Ray Train over ``job.run.scaling.num_workers`` workers; its checkpoints under ``job.run_dir``."""
    try:
        ray_wait = ray_start.wait()  # Ray was started on a thread while the driver prepared the job
    except ClusterError as err:
        raise TrainError(str(err)) from None
    clock.mark("ray_wait")
    import ray.train
    from ray.train.torch import TorchTrainer

    from aigc.training.progress import ProgressPoller
    from aigc.training.validation import validation_config
    from aigc.training.worker import train_loop

    cfg = job.run
    sc, tc = cfg.scaling, cfg.trainer
    if tc.eval_every_steps:
        _prepare_evaluator(job, messages)
    resources = {"CPU": sc.cpus_per_worker}
    if sc.use_gpu:
        resources["GPU"] = sc.gpus_per_worker or 1.0
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=job.to_json(),
        scaling_config=ray.train.ScalingConfig(
            # An int, or (min, max): Ray Train V2's elastic policy then starts with what the cluster
            # can place and resizes (restarting the workers from the last checkpoint) as it changes.
            num_workers=sc.num_workers,
            use_gpu=sc.use_gpu,
            resources_per_worker=resources,
            elastic_resize_monitor_interval_s=sc.elastic_resize_interval_s,
        ),
        run_config=ray.train.RunConfig(
            name=job.name,
            storage_path=job.run_dir.rsplit("/", 1)[0],
            failure_config=ray.train.FailureConfig(max_failures=sc.max_failures),
            checkpoint_config=_checkpoint_config(tc),
            worker_runtime_env=worker_runtime_env(),
        ),
        validation_config=validation_config(job),
    )
    poller = ProgressPoller(job.tracking_uri, job.run_id, cfg.trainer.max_steps, callback=progress)
    poller.start()
    clock.mark("submit")
    startup = _startup_figures(job, clock, ray_start.seconds, ray_wait)
    try:
        with _start_timeout(sc):
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


#: Ray Train's setting for how long a worker group may take to be placed and started. Read from the
#: driver's environment when ``fit()`` starts the controller, which passes it on (ray 2.60,
#: ray/train/v2/_internal/constants.py ENV_VARS_TO_PROPAGATE).
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


@contextmanager
def _start_timeout(sc) -> Iterator[None]:
    """``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`` for the duration of ``fit()`` (restored after, so an
    in-process caller's next job is not affected): ``scaling.worker_start_timeout_s`` when set, else
    what the user exported, else the elastic default (:attr:`ScalingConfig.start_timeout_s`)."""
    old = os.environ.get(START_TIMEOUT_ENV)
    seconds = sc.worker_start_timeout_s
    if seconds is None and old is None:
        seconds = sc.start_timeout_s  # the elastic default, or None: Ray's own
    if seconds is None:
        yield
        return
    os.environ[START_TIMEOUT_ENV] = f"{seconds:g}"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(START_TIMEOUT_ENV, None)
        else:
            os.environ[START_TIMEOUT_ENV] = old


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

        from aigc.tracking import client_for

        now = int(time.time() * 1000)
        client_for(job.tracking_uri).log_batch(
            job.run_id, metrics=[Metric(k, v, now, 0) for k, v in figures.items()]
        )
    except Exception:  # noqa: BLE001 - a store that fails now fails the run's own logging too
        log.warning("could not log the start-up figures of run %s", job.run_id, exc_info=True)


# ---------------------------------------------------------------------------------- finish


def _finish(prep: _Prepared, job: TrainJob, result: Any, say: Messages) -> TrainResult:
    """The finished job's summary: what the loader skipped, the final grid and evaluation, and the
    run's description completed with them."""
    from aigc import tracking

    metrics = result.metrics or {}
    out = TrainResult(
        name=job.name,
        run_id=job.run_id,
        experiment_id=job.experiment_id,
        tracking_uri=job.tracking_uri,
        status="FINISHED",
        global_step=int(metrics.get("step", 0)),
        checkpoint=final_checkpoint(job.run_dir),
        run_dir=job.run_dir,
        metrics={
            k: float(v)
            for k, v in metrics.items()
            # Not the eval/* figures Ray merged in from the last checkpoint's evaluation during
            # training (the run's figures are its model's: TrainResult.eval), nor the placeholder
            # of a checkpoint metric not measured (StepCheckpoint).
            if isinstance(v, (int, float))
            and k not in ("step", "epoch")
            and not is_eval_key(k)
            and math.isfinite(v)
        },
        data_modified=prep.modified,
    )
    client = tracking.client_for(job.tracking_uri)
    out.bad_samples, out.bad_fraction, out.bad_shards = tracking.skipped_samples(client, job.run_id)
    max_bad = prep.cfg.data.max_bad_fraction
    if out.bad_samples:
        say(f"warning: {bad_samples_line(out, max_bad)}")
    best = _best_evaluated(job, say) if prep.cfg.trainer.eval_every_steps else None
    if best is not None:  # the run's model is its best checkpoint, measured while training went on
        out.checkpoint, out.checkpoint_step = best.pop("checkpoint"), best.pop("step")
        out.eval = best
        # Its figures are in the run at its step already; its guards become the run's.
        from aigc.evaluation.final import log_evaluation

        log_evaluation(job.tracking_uri, job.run_id, best, metrics=False)
    elif out.checkpoint:
        out.checkpoint_step = _checkpoint_step(out.checkpoint)
    if out.checkpoint:
        client.set_tag(job.run_id, TAG_CHECKPOINT_STEP, str(out.checkpoint_step))
        out.sample_grid = _final_grid(job.run_dir)
        if prep.request.evaluate and best is None:
            out.eval = _final_evaluation(job, out, prep.request.eval_samples, say)
    notes = [f"Data: {bad_samples_line(out, max_bad)}"] if out.bad_samples else []
    if prep.modified:
        notes.append(f"Data: shards differed from the manifest: {'; '.join(prep.modified)}")
    done = prep.description(
        steps=out.global_step,
        eval_figures=out.eval,
        sample_grid=FINAL_GRID if out.sample_grid else None,
        notes=notes,
    )
    client.set_tag(job.run_id, tracking.TAG_RUN_NOTE, done)
    return out


def _best_evaluated(job: TrainJob, say: Messages) -> dict[str, Any] | None:
    """The report of the run's best complete checkpoint by ``trainer.checkpoint_metric``
    (:func:`~aigc.training.job.best_checkpoint`), announced; None when none was evaluated (the
    final evaluation then measures the last checkpoint, as for a run that does not evaluate)."""
    from aigc.training.job import best_checkpoint, evaluated_checkpoints

    tc = job.run.trainer
    best = best_checkpoint(job.run_dir, tc.checkpoint_metric, tc.checkpoint_mode)
    if best is None:
        say(
            f"warning: no checkpoint of {job.run_dir} was evaluated with {tc.checkpoint_metric} during "
            "training (see the evaluation tasks' errors in the Ray logs); the last checkpoint is the "
            "run's model and is evaluated now"
        )
        return None
    kept = ", ".join(
        f"{r['step']}: {r[tc.checkpoint_metric]:.4g}"
        for r in evaluated_checkpoints(job.run_dir)
        if tc.checkpoint_metric in r
    )
    say(
        f"the run's model is the checkpoint of step {best['step']}: {tc.checkpoint_metric} "
        f"{best[tc.checkpoint_metric]:.4g}, the {'lowest' if tc.checkpoint_mode == 'min' else 'highest'} "
        f"of the checkpoints kept (step: {tc.checkpoint_metric}: {kept})"
    )
    return best


def _checkpoint_step(checkpoint: str) -> int:
    """The step of a checkpoint file of the run folder, from its folder's step file."""
    import fsspec

    with fsspec.open(f"{checkpoint.rsplit('/', 1)[0]}/{STEP_FILE}", "r") as f:
        return int(json.load(f)["global_step"])


def write_metrics(path: str | Path, out: TrainResult) -> None:
    """``--metrics-out``: what DVC compares across experiments (``dvc metrics diff``, ``dvc exp
    show``): the run id, the step, the numeric figures and the guards; their provenance stays in
    the run's ``aigc.eval.*`` tags. ``checkpoint_step`` is the step of the run's model (the best
    evaluated checkpoint's, when the run evaluated during training), whose figures these are."""
    record = {"run_id": out.run_id, "step": out.global_step, **eval_figures(out.eval)}
    if out.checkpoint_step is not None:
        record["checkpoint_step"] = out.checkpoint_step
    record.update({g: out.eval[g] for g in GUARDS if g in out.eval})
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def bad_samples_line(out: TrainResult, max_bad_fraction: float) -> str:
    """One line on the samples the loader skipped, for the terminal and the run's description."""
    return (
        f"the loader skipped {out.bad_samples} unreadable train samples in an epoch "
        f"({out.bad_fraction:.2%} of the split, under data.max_bad_fraction {max_bad_fraction}); "
        f"worst shards: {out.bad_shards or 'unknown'}"
    )


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
    return max(1, min(os.cpu_count() or 1, int(sc.max_workers * sc.cpus_per_worker)))


def _workers_text(sc) -> str:
    """``2``, or ``1-2`` for an elastic job (the run description says how many workers)."""
    return f"{sc.min_workers}-{sc.max_workers}" if sc.elastic else str(sc.num_workers)


def _final_evaluation(job: TrainJob, out: TrainResult, num_samples: int, say: Messages) -> dict[str, Any]:
    """The final checkpoint through :func:`aigc.evaluation.final.final_evaluation`, logged to the run.

    The checkpoint and the data are read where the job wrote and streamed them: local folders or
    fsspec URLs (``s3://...``) alike."""
    from aigc.evaluation.final import final_evaluation, load_model_from, log_evaluation

    threads = evaluation_threads(job)
    say(f"final evaluation of step {out.checkpoint_step} on {threads} thread(s)")
    report = final_evaluation(
        load_model_from(out.checkpoint),
        job.data_location,
        num_samples=num_samples,
        seed=job.run.trainer.seed,
        threads=threads,
        progress=say,
    )
    log_evaluation(job.tracking_uri, job.run_id, report, step=out.checkpoint_step or out.global_step)
    return report

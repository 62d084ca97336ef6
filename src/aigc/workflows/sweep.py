"""``aigc sweep``: a hyperparameter search on Ray Tune whose every trial is an ``aigc train`` job.

The shape is the one Ray documents for Ray Train V2 under Tune: a *function trainable* that launches
the Ray Train job (:func:`run_trial`), run by a ``Tuner`` with ``max_concurrent_trials``. Each trial
calls :func:`aigc.training.launcher.train` with the trial's values as ``--set`` overrides, so a
trial is exactly an ``aigc train`` job: same checks of the config and the data, same MLflow run,
same checkpoints and same ``--resume``. Trials are named ``<sweep>-t000``, ``<sweep>-t001``, ... from
Tune's trial counter, so their run folders and MLflow runs can be found again.

**MLflow.** The sweep opens one parent run (params: the search space, scheduler, metric, mode,
trials, concurrent, seed; at the end the best trial and value as tags and a ``best/<metric>``
metric); each trial's run carries ``mlflow.parentRunId`` (``TrainRequest.parent_run_id``), so the UI
nests the trials under the sweep and its compare view and parallel-coordinates chart show them.

**The metric reaches Tune from the trial's MLflow run.** The trainable runs ``train()`` on a thread
of its own and, on the trainable's own thread, polls the run's history of ``metric`` (as
:class:`~aigc.training.progress.ProgressPoller` polls ``train/loss``) and hands every new
``(step, value)`` to ``ray.tune.report``. Any metric the run logs therefore works: ``val/loss``,
``train/loss``, or the ``eval/*`` figures that ``trainer.eval_every_steps`` measures in Ray Train's
validation tasks (Ray Train V2's ``TuneReportCallback`` forwards only the training workers' reports,
not validation results). ``tune.report`` is called from the trainable's thread only: in ray 2.60 it
puts the result on the session's queue, then blocks until Tune asks for the next one, and when Tune
has decided to stop the trial it raises ``SystemExit`` *in the calling thread*
(``ray/train/_internal/session.py``, ``_report_training_result``); that must be the thread that ends
the trainable. A non-finite value (a diverged trial's NaN loss) is reported as the worst value,
since ASHA's ``cur_rew < cutoff`` is never true for NaN.

**ASHA** (``--scheduler asha``: Tune's ``ASHAScheduler`` with ``time_attr="step"``, ``max_t`` the
config's ``trainer.max_steps``, ``stop_last_trials=False`` so that a trial reaching ``max_t`` is
left to its job, which ends by itself, evaluates and closes its run) stops weak trials at its rungs.
Tune then stops the trial's actor, and with it the Ray Train job the actor owns; the job's MLflow run
would stay RUNNING, so the sweep driver marks it KILLED with the tag ``aigc.sweep.stopped=asha``
(:class:`_SweepCallback`). A failed trial's run is FAILED, by the train path itself.

**Resources.** A trial's Ray Train job needs ``scaling.num_workers x cpus_per_worker`` CPUs; the
trial's actor, which only waits on the job and polls MLflow, asks for no CPU
(``tune.with_resources(..., {"cpu": 0, "memory": 256 MiB})``; ray 2.60 refuses a request of nothing
at all): with Tune's default of 1 CPU per trial actor, two concurrent trials of one worker each
would need 4 CPUs, and on a 2-core machine the second trial's workers would never be placed. The
sweep checks before it starts that ``concurrent`` jobs fit in the cluster's CPUs.

**Resume** (``aigc sweep --resume NAME``). The sweep's record (``<storage>/<sweep>/aigc-sweep.json``:
the resolved plan, its seed and the parent run) and the trials' MLflow runs are the state, not Tune's
experiment checkpoint: a fresh ``Tuner`` with the same seed generates the same trials in the same
order (Tune's ``BasicVariantGenerator(random_state=seed)``), hence the same names, and each trial
decides from its run what to do: a FINISHED run, or one the scheduler stopped, is not run again (its
history is reported to Tune so that ASHA's rungs hold it again); any other run (cut off RUNNING,
KILLED by Ctrl-C, or FAILED, as ``aigc train --resume`` continues a failed run: a failure that may
pass, a store that was busy, is tried again) continues with ``TrainRequest(resume=<trial name>)``,
into the same MLflow run, from its last checkpoint; a trial with no run folder starts.
``Tuner.restore`` was not used: it brings back the ``RunConfig`` callbacks and the scheduler pickled
at the first launch (ASHA's rungs as they were then, empty) and knows only what Tune's periodic
experiment checkpoint had written before the kill.
"""

from __future__ import annotations

import math
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator

from aigc import project_root
from aigc.config import ConfigError, StrictModel, load_config, load_yaml, validate
from aigc.contract import CHECKPOINT_METRICS, TAG_RUN_NAME

__all__ = [
    "PARAM_FORMS",
    "ParamSpec",
    "SweepError",
    "SweepFile",
    "SweepResult",
    "TrialRow",
    "load_sweep_file",
    "parse_param",
    "parse_params",
    "run_sweep",
]

#: The forms a ``--param KEY=SPEC`` may take, named in every parse error.
PARAM_FORMS = (
    "uniform:LOW:HIGH",
    "loguniform:LOW:HIGH",
    "randint:LOW:HIGH (integers, both ends included)",
    "choice:A,B,...",
    "grid:A,B,... (every value, for each of the --trials samples)",
)
SWEEP_FILE = "aigc-sweep.json"
TAG_SWEEP = "aigc.sweep.name"
TAG_STOPPED = "aigc.sweep.stopped"
TAG_BEST_TRIAL = "aigc.sweep.best_trial"
TAG_BEST_RUN = "aigc.sweep.best_run_id"
TAG_BEST_VALUE = "aigc.sweep.best_value"
TAG_REGISTERED = "aigc.sweep.registered"
#: The key the metric goes to Tune under: Tune splits result keys at "/" when it looks one up
#: (``unflattened_lookup``), so ``val/loss`` itself would be read as ``result["val"]["loss"]``.
SCORE = "score"
FINISHED = "finished"  # set in a trial's last report once its train job has returned

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,119}$")


class SweepError(RuntimeError):
    """A sweep that cannot start or resume; the message says why and what to do."""


# ------------------------------------------------------------------------------------- params


def _scalar(text: str) -> Any:
    """A value as ``--set`` reads it (YAML): ``32`` -> 32, ``1e-3`` -> 0.001, ``true`` -> True."""
    text = text.strip()
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        return text
    if isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", value):
        return float(value)  # YAML 1.1 reads 1e-3 as a string
    return value


@dataclass(frozen=True)
class ParamSpec:
    """One searched config key: ``key`` and how Tune draws it (``kind`` with ``args``)."""

    key: str
    kind: Literal["uniform", "loguniform", "randint", "choice", "grid"]
    args: tuple[Any, ...]

    @property
    def text(self) -> str:
        """The spec as a user writes it: ``loguniform:0.0001:0.01``."""
        sep = "," if self.kind in ("choice", "grid") else ":"
        return f"{self.kind}:{sep.join(_plain(a) for a in self.args)}"

    def domain(self) -> Any:
        """The Tune search-space object for this key."""
        from ray import tune

        if self.kind == "uniform":
            return tune.uniform(*self.args)
        if self.kind == "loguniform":
            return tune.loguniform(*self.args)
        if self.kind == "randint":
            return tune.randint(self.args[0], self.args[1] + 1)  # Tune's upper end is excluded
        if self.kind == "choice":
            return tune.choice(list(self.args))
        return tune.grid_search(list(self.args))

    def probes(self) -> list[Any]:
        """Values that bound the space, checked against the run config before anything starts: the
        ends and an inner point of a range (a float range on an int key fails on the inner point),
        every value of a choice or grid."""
        if self.kind in ("choice", "grid"):
            return list(self.args)
        low, high = self.args
        if self.kind == "randint":
            return [low, high]
        inner = (
            math.exp(math.log(low) * 0.63 + math.log(high) * 0.37)
            if self.kind == "loguniform"
            else (low * 0.63 + high * 0.37)
        )
        return [low, inner, high]

    def override(self, value: Any) -> str:
        """The ``--set`` override of this key for one trial's value."""
        return f"{self.key}={_plain(value)}"


def _plain(value: Any) -> str:
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _forms() -> str:
    return "; ".join(PARAM_FORMS)


def parse_param(text: str, spec: str | None = None) -> ParamSpec:
    """``KEY=SPEC`` (or ``key`` and ``spec`` apart, as a sweep file holds them) as a
    :class:`ParamSpec`; a :class:`~aigc.config.ConfigError` names the param and the allowed forms."""
    if spec is None:
        if "=" not in text:
            raise ConfigError(f"--param {text!r}: expected KEY=SPEC, e.g. trainer.lr=loguniform:1e-4:1e-2")
        key, spec = text.split("=", 1)
    else:
        key = text
    key, spec = key.strip(), str(spec).strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"--param {text!r}: bad key {key!r}")
    kind, sep, rest = spec.partition(":")
    where = f"--param {key}={spec}"
    if not sep or kind not in ("uniform", "loguniform", "randint", "choice", "grid"):
        raise ConfigError(f"{where}: unknown form; allowed: {_forms()}")
    if kind in ("choice", "grid"):
        values = [_scalar(v) for v in rest.split(",")]
        if not rest.strip() or any(v == "" for v in values):
            raise ConfigError(f"{where}: {kind} needs values separated by commas, e.g. {kind}:32,64")
        if len(set(map(repr, values))) != len(values):
            raise ConfigError(f"{where}: a value is given twice")
        return ParamSpec(key, kind, tuple(values))  # type: ignore[arg-type]
    parts = rest.split(":")
    numbers = [_scalar(p) for p in parts]
    if len(parts) != 2 or not all(isinstance(n, (int, float)) and not isinstance(n, bool) for n in numbers):
        raise ConfigError(f"{where}: {kind} needs two numbers, {kind}:LOW:HIGH; allowed: {_forms()}")
    low, high = numbers
    if kind == "randint":
        if not all(isinstance(n, int) for n in numbers):
            raise ConfigError(f"{where}: randint needs integers, e.g. randint:1:4")
    else:
        low, high = float(low), float(high)
    if not low < high:
        raise ConfigError(f"{where}: LOW must be below HIGH")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{where}: loguniform needs LOW > 0")
    return ParamSpec(key, kind, (low, high))  # type: ignore[arg-type]


def parse_params(items: Iterable[str] | Mapping[str, Any]) -> list[ParamSpec]:
    """``--param`` items (``KEY=SPEC``) or a sweep file's ``params`` mapping; a key given twice is
    an error."""
    specs = (
        [parse_param(k, v) for k, v in items.items()]
        if isinstance(items, Mapping)
        else [parse_param(item) for item in items]
    )
    seen: set[str] = set()
    for s in specs:
        if s.key in seen:
            raise ConfigError(f"--param {s.key}: given twice")
        seen.add(s.key)
    return specs


def check_params(config: str | Path, overrides: list[str], specs: list[ParamSpec]) -> None:
    """Every param's key and probe values through the run config's own validation
    (:func:`aigc.config.load_config`): a typo in a key, or a value the key refuses, is a
    :class:`ConfigError` naming the param, before any trial starts."""
    for s in specs:
        for value in s.probes():
            try:
                load_config(config, [*overrides, s.override(value)])
            except ConfigError as err:
                raise ConfigError(f"--param {s.key}={s.text}: with {s.key}={_plain(value)}: {err}") from None


# -------------------------------------------------------------------------------- sweep file


class SweepFile(StrictModel):
    """A sweep as a YAML file (``aigc sweep --file sweep.yaml``); the command's flags, by name.

    ``params`` maps a config key to its spec (``trainer.lr: loguniform:1e-4:1e-2``); ``set`` holds
    ``--set`` overrides applied to every trial."""

    config: str = Field(description="run config, e.g. models/diffusion.yaml")
    params: dict[str, str] = Field(
        description="config key -> uniform:a:b | loguniform:a:b | randint:a:b | choice:a,b,... | grid:a,b,..."
    )
    trials: int = Field(4, ge=1, description="samples drawn from the space (times the grid's size)")
    concurrent: int = Field(1, ge=1, description="trials at a time (Tune's max_concurrent_trials)")
    scheduler: Literal["fifo", "asha"] = Field(
        "fifo", description="fifo: every trial runs to the end; asha: weak trials stop early"
    )
    metric: str | None = Field(
        None,
        description="run metric to compare; default eval/fd where the config "
        "sets trainer.eval_every_steps, else val/loss",
    )
    mode: Literal["min", "max"] | None = Field(None, description="default: the metric's own (min for losses)")
    name: str | None = Field(None, description="sweep name; default sweep-<UTC timestamp>")
    set: list[str] = Field(default_factory=list, description="overrides applied to every trial")
    seed: int = Field(0, description="seed of the draws: the same seed draws the same trials")
    grace_period: int | None = Field(None, ge=1, description="asha: steps before a trial can be stopped")
    reduction_factor: int = Field(2, ge=2, description="asha: 1/reduction_factor of trials go on at a rung")
    workers: int | None = Field(None, ge=1, description="Ray Train workers per trial (scaling.num_workers)")
    evaluate: bool = Field(False, description="each trial's final evaluation (as aigc train --eval)")
    eval_samples: int = Field(500, ge=2, description="samples of that final evaluation")
    register_best: bool = Field(False, description="register the best trial's run (aigc register)")
    ray_address: str | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        if value is not None and not _NAME_RE.match(value):
            raise ValueError("use letters, digits, '.', '_' and '-' (max 120)")
        return value

    @field_validator("params")
    @classmethod
    def _params(cls, value: dict[str, str]) -> dict[str, str]:
        if not value:
            raise ValueError("give at least one param, e.g. trainer.lr: loguniform:1e-4:1e-2")
        return value


def load_sweep_file(path: str | Path, **flags: Any) -> SweepFile:
    """A sweep file, with the flags given on the command line (not None) on top; errors name the key.
    A relative ``config`` is relative to the sweep file's folder, then to the working directory."""
    data = load_yaml(path)
    for key, value in flags.items():
        if value is None or value == [] and key in ("params", "set"):
            continue
        if key == "params" and isinstance(value, list):
            data["params"] = {
                **(data.get("params") or {}),
                **{p.split("=", 1)[0]: p.split("=", 1)[1] for p in value if "=" in p},
            }
        elif key == "set":
            data["set"] = [*(data.get("set") or []), *value]
        else:
            data[key] = value
    unknown = sorted(set(data) - set(SweepFile.model_fields))
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], list(SweepFile.model_fields), n=1)
        hint = f"; did you mean `{close[0]}`?" if close else ""
        raise ConfigError(
            f"{path}: {unknown[0]}: unknown key{hint}; allowed keys: {', '.join(SweepFile.model_fields)}"
        )
    try:
        sweep = validate(SweepFile, data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    cfg = Path(sweep.config)
    if not cfg.is_absolute() and not cfg.exists() and (Path(path).parent / cfg).exists():
        sweep.config = str(Path(path).parent / cfg)
    return sweep


# --------------------------------------------------------------------------------- the plan


class SweepPlan(StrictModel):
    """A sweep resolved in the driver: what every trial and a ``--resume`` need, every path absolute
    (trial actors run in Tune's trial folder, possibly on another node). Written to
    ``<storage>/<name>/aigc-sweep.json``."""

    name: str
    config: str
    params: dict[str, str]
    overrides: list[str]
    trials: int
    concurrent: int
    scheduler: str
    metric: str
    mode: str
    seed: int
    grace_period: int | None
    reduction_factor: int
    max_steps: int
    workers: int | None
    evaluate: bool
    eval_samples: int
    register_best: bool
    ray_address: str | None
    storage: str
    tracking_uri: str
    experiment: str
    root: str
    parent_run_id: str = ""

    def specs(self) -> list[ParamSpec]:
        return parse_params(self.params)

    def trial_name(self, index: int) -> str:
        return f"{self.name}-t{index:03d}"

    @property
    def folder(self) -> str:
        return f"{self.storage}/{self.name}"


def _plan(sweep: SweepFile) -> SweepPlan:
    """The sweep file resolved against the run config: keys checked, metric and mode chosen, the
    store and the storage path made absolute and handed to every trial as overrides."""
    from aigc import tracking
    from aigc.training.job import check_storage, storage_location

    specs = parse_params(sweep.params)
    root = project_root()
    config = str(Path(sweep.config).expanduser().resolve())
    cfg = load_config(config, sweep.set)
    check_params(config, sweep.set, specs)
    metric = sweep.metric or ("eval/fd" if cfg.trainer.eval_every_steps else "val/loss")
    mode = sweep.mode or CHECKPOINT_METRICS.get(metric, "min")
    storage = storage_location(cfg, root)
    check_storage(storage)
    uri = tracking.resolve_tracking_uri(cfg.tracking.uri)
    name = sweep.name or f"sweep-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}"
    grace = sweep.grace_period or max(1, cfg.trainer.max_steps // 4)
    if sweep.scheduler == "asha" and grace > cfg.trainer.max_steps:
        raise ConfigError(f"grace_period {grace} is above trainer.max_steps {cfg.trainer.max_steps}")
    return SweepPlan(
        name=name,
        config=config,
        params={s.key: s.text for s in specs},
        # The trials' run folders and store, fixed now: the trial actors run elsewhere.
        overrides=[*sweep.set, f"scaling.storage_path={storage}", f"tracking.uri={uri}"],
        trials=sweep.trials,
        concurrent=sweep.concurrent,
        scheduler=sweep.scheduler,
        metric=metric,
        mode=mode,
        seed=sweep.seed,
        grace_period=grace,
        reduction_factor=sweep.reduction_factor,
        max_steps=cfg.trainer.max_steps,
        workers=sweep.workers,
        evaluate=sweep.evaluate,
        eval_samples=sweep.eval_samples,
        register_best=sweep.register_best,
        ray_address=sweep.ray_address or cfg.scaling.ray_address,
        storage=storage,
        tracking_uri=uri,
        experiment=cfg.tracking.experiment,
        root=str(root),
    )


def _write_plan(plan: SweepPlan) -> None:
    import fsspec

    fs, path = fsspec.core.url_to_fs(plan.folder)
    fs.makedirs(path, exist_ok=True)
    with fsspec.open(f"{plan.folder}/{SWEEP_FILE}", "w") as f:
        f.write(plan.model_dump_json(indent=2) + "\n")


def _read_plan(storage: str, name: str) -> SweepPlan:
    import fsspec

    url = f"{storage}/{name}/{SWEEP_FILE}"
    try:
        with fsspec.open(url, "r") as f:
            return SweepPlan.model_validate_json(f.read())
    except FileNotFoundError:
        raise SweepError(f"nothing to resume: no sweep {name!r} under {storage} ({url} is missing)") from None


def _sweep_exists(storage: str, name: str) -> bool:
    import fsspec

    fs, path = fsspec.core.url_to_fs(f"{storage}/{name}")
    return fs.exists(path)


# ------------------------------------------------------------------------------ the trainable


def trial_index(trial_id: str) -> int:
    """The trial's number from its Tune id (``BasicVariantGenerator``: ``<5 hex>_<counter:05d>``)."""
    return int(trial_id.rsplit("_", 1)[-1])


#: The score a non-finite value goes to Tune as: the worst, but finite. With +-inf ASHA's cutoff
#: (``np.nanpercentile``) computes inf - inf and warns, and Tune's loggers warn on every result.
WORST = 1e30


def _worst(mode: str) -> float:
    return WORST if mode == "min" else -WORST


def _find_trial_run(client: Any, plan: SweepPlan, name: str) -> Any | None:
    """The trial's MLflow run: tagged with its name and nested under the sweep's run."""
    from aigc.tracking.context import TAG_PARENT_RUN

    experiment = client.get_experiment_by_name(plan.experiment)
    if experiment is None:
        return None
    runs = client.search_runs(
        [experiment.experiment_id],
        f"tags.`{TAG_RUN_NAME}` = '{name}' and tags.`{TAG_PARENT_RUN}` = '{plan.parent_run_id}'",
        max_results=2,
    )
    return runs[0] if runs else None


def _history(client: Any, run_id: str, metric: str) -> list[tuple[int, float]]:
    """The run's ``metric`` as (step, value), one value per step (the first logged), by step."""
    points: dict[int, float] = {}
    for m in sorted(client.get_metric_history(run_id, metric), key=lambda m: (m.step, m.timestamp)):
        points.setdefault(int(m.step), float(m.value))
    return sorted(points.items())


def run_trial(config: dict[str, Any], plan_json: str) -> None:
    """Ray Tune's function trainable of a sweep: one trial, an ``aigc train`` job.

    Runs in the trial's actor, on the thread Tune gives the function. ``train()`` runs on a thread of
    its own (daemon: when Tune stops the trial the actor exits without waiting for it, and the Ray
    Train job the actor owns dies with it); this thread polls the run's ``metric`` and reports each
    new step to Tune (see the module doc for why here), then reports once more with ``finished``
    after ``train()`` returned, or raises what it raised (Tune marks the trial ERROR; the run is
    already FAILED).
    """
    from ray import tune

    from aigc.tracking import client_for
    from aigc.training.job import run_exists
    from aigc.training.launcher import train
    from aigc.training.request import TrainRequest

    plan = SweepPlan.model_validate_json(plan_json)
    os.environ.setdefault("AIGC_PROJECT_ROOT", plan.root)  # the actor runs in Tune's trial folder
    name = plan.trial_name(trial_index(tune.get_context().get_trial_id()))
    client = client_for(plan.tracking_uri)
    overrides = [
        *plan.overrides,
        *(s.override(config[s.key]) for s in plan.specs()),
        f"tracking.run_name={name}",  # the run's display name in the UI: the trial, not the config's
    ]
    reporter = _Reporter(client, plan.metric, plan.mode, name)
    run = _find_trial_run(client, plan, name)
    if run is not None and (run.info.status == "FINISHED" or TAG_STOPPED in run.data.tags):
        # Done before a resume: not run again; Tune (and ASHA's rungs) get its history back.
        reporter.run_id = run.info.run_id
        reporter.report_new()
        if run.info.status == "FINISHED":
            reporter.report_last(finished=True)
        return
    resume = run_exists(plan.storage, name)
    if run is not None and not resume:
        # Its run was opened but the job never started (no run folder): nothing to continue.
        client.delete_run(run.info.run_id)
        run = None
    request = TrainRequest(
        config=None if resume else plan.config,
        overrides=overrides,
        workers=plan.workers,
        name=None if resume else name,
        resume=name if resume else None,
        evaluate=plan.evaluate,
        eval_samples=plan.eval_samples,
        register=False,
        parent_run_id=plan.parent_run_id,
    )
    outcome: dict[str, Any] = {}

    def job() -> None:
        try:
            outcome["result"] = train(request, progress=_quiet, messages=_trial_messages(name))
        except BaseException as err:  # noqa: BLE001 - re-raised on the trainable's thread
            outcome["error"] = err

    thread = threading.Thread(target=job, name=f"aigc-trial-{name}", daemon=True)
    thread.start()
    if run is not None:
        reporter.run_id = run.info.run_id
    while True:
        done = not thread.is_alive()  # read before the poll, so the last poll sees every value
        if reporter.run_id is None:
            reporter.run_id = _job_run_id(plan.storage, name)
        if reporter.run_id is not None:
            try:
                reporter.report_new()
            except SystemExit:
                raise  # Tune stops the trial (tune.report, see the module doc)
            except Exception:  # noqa: BLE001 - the store blinked; the next poll asks again
                pass
        if done:
            break
        time.sleep(_POLL_S)
    if "error" in outcome:
        raise outcome["error"]
    reporter.report_last(finished=True, step=outcome["result"].global_step)


_POLL_S = 1.0
#: The logical memory (bytes) a trial's actor reserves instead of a CPU (see _tune).
TRIAL_ACTOR_MEMORY = 256 * 2**20


def _quiet(_state: dict[str, Any]) -> None:
    pass


def _trial_messages(name: str) -> Callable[[str], None]:
    def say(message: str) -> None:
        sys.stderr.write(f"[{name}] {message}\n")
        sys.stderr.flush()

    return say


def _job_run_id(storage: str, name: str) -> str | None:
    """The run id in the trial's job record, once ``train()`` has written it."""
    from aigc.training.job import TrainError, read_job

    try:
        return read_job(storage, name).run_id
    except TrainError:
        return None


class _Reporter:
    """Hands a run's ``metric`` history to Tune, each step once (``ray.tune.report``)."""

    def __init__(self, client: Any, metric: str, mode: str, name: str):
        self.client, self.metric, self.mode, self.name = client, metric, mode, name
        self.run_id: str | None = None
        self.last: tuple[int, float] | None = None

    def _report(self, step: int, value: float, **extra: Any) -> None:
        from ray import tune

        score = value if math.isfinite(value) else _worst(self.mode)
        tune.report({"step": step, SCORE: score, "value": value, "run_id": self.run_id, **extra})

    def report_new(self) -> None:
        assert self.run_id is not None
        points = dict(_history(self.client, self.run_id, self.metric))
        for step in self._diverged():
            points.setdefault(step, float("nan"))
        for step, value in sorted(points.items()):
            if self.last is None or step > self.last[0]:
                self._report(step, value)
                self.last = (step, value)

    def _diverged(self) -> list[int]:
        """The steps where the job's loss was not finite: the train path drops non-finite values
        (``callbacks._scalar_metrics``), so a diverged trial logs ``train/lr`` at a step without
        ``train/loss`` (the two are logged together) and never logs its ``metric`` again. Reported
        to Tune as NaN, the worst score, so that ASHA can stop it."""
        lr = {int(m.step) for m in self.client.get_metric_history(self.run_id, "train/lr")}
        if not lr:
            return []
        loss = {int(m.step) for m in self.client.get_metric_history(self.run_id, "train/loss")}
        return sorted(lr - loss)

    def report_last(self, finished: bool, step: int | None = None) -> None:
        """The trial's last value once more, marked ``finished`` (at its last step, where Tune has it
        already: ASHA records a trial once per rung)."""
        if self.last is None:
            return  # the metric was never logged: the sweep's table says so
        self._report(max(self.last[0], step or 0), self.last[1], **{FINISHED: 1 if finished else 0})


# ------------------------------------------------------------------------------------ driver


@dataclass
class TrialRow:
    """One trial in the sweep's table, read back from its MLflow run."""

    name: str
    run_id: str
    status: str  # FINISHED, STOPPED (by the scheduler), FAILED, KILLED (interrupted), RUNNING
    params: dict[str, str]
    value: float | None
    step: int | None


@dataclass
class SweepResult:
    name: str
    parent_run_id: str
    experiment_id: str
    tracking_uri: str
    metric: str
    mode: str
    trials: list[TrialRow] = field(default_factory=list)
    best: TrialRow | None = None
    registered: str | None = None  # "aigc-<family>/<version>" with --register-best
    seconds: float = 0.0
    keys: list[str] = field(default_factory=list)  # the searched config keys


Say = Callable[[str], None]


def _stderr(message: str) -> None:
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def run_sweep(
    sweep: SweepFile | None = None,
    *,
    resume: str | None = None,
    storage_overrides: list[str] | None = None,
    register_best: bool | None = None,
    say: Say | None = _stderr,
) -> SweepResult:
    """Run ``sweep`` (or continue sweep ``resume``, found under the storage path that
    ``storage_overrides`` such as ``scaling.storage_path=...`` give, else the default) and return its
    table. Raises :class:`~aigc.config.ConfigError` before anything starts for a bad param, key or
    value, :class:`SweepError` for a sweep that exists already or is not there to resume.
    ``register_best`` given with ``resume`` replaces the plan's ``--register-best``."""
    from aigc import tracking
    from aigc.cluster import ClusterError, RayStart

    t0 = time.perf_counter()
    say = say or (lambda _m: None)
    if resume is not None:
        from aigc.training.job import storage_location

        storage = storage_location(load_config(None, storage_overrides or []), project_root())
        plan = _read_plan(storage, resume)
        if register_best is not None:  # the one choice a resume may change: what happens at the end
            plan.register_best = register_best
    else:
        assert sweep is not None
        plan = _plan(sweep)
        if _sweep_exists(plan.storage, plan.name):
            raise SweepError(
                f"a sweep named {plan.name!r} already exists under {plan.storage}; "
                f"continue it with `aigc sweep --resume {plan.name}` or choose another --name"
            )
    try:
        RayStart(plan.ray_address).wait()
    except ClusterError as err:
        raise SweepError(str(err)) from None
    _check_fits(plan)
    client = tracking.client_for(plan.tracking_uri)
    if resume is None:
        plan.parent_run_id = tracking.start_job_run(
            plan.tracking_uri,
            plan.experiment,
            run_name=plan.name,
            params=_parent_params(plan),
            tags={TAG_SWEEP: plan.name, tracking.TAG_RUN_NOTE: _description(plan)},
        )
        _write_plan(plan)
        opened = tracking.guard_run(plan.tracking_uri, plan.parent_run_id)
    else:
        opened = tracking.resumed_job_run(plan.tracking_uri, plan.parent_run_id)
    experiment_id = client.get_run(plan.parent_run_id).info.experiment_id
    say(
        f"sweep {plan.name}: {plan.trials} trial(s){_grid_note(plan)}, {plan.concurrent} at a time, "
        f"{plan.scheduler} on {plan.metric} ({plan.mode}); parent run {plan.parent_run_id}"
        + (" (resumed)" if resume else "")
    )
    with opened:
        if resume is None:
            _log_sweep_dataset(client, plan)
        try:
            _tune(plan, say)
        except BaseException:
            _close_cut_off_trials(client, plan)  # trial actors die with this driver
            raise
        _settle_stopped(client, plan)
        _close_cut_off_trials(client, plan)
        result = _collect(client, plan, experiment_id)
        _record_best(client, plan, result)
        if plan.register_best and result.best is not None:
            from aigc.registry.register import register_run

            r = register_run(result.best.run_id, plan.tracking_uri, progress=say)
            result.registered = f"{r.name}/{r.version}"
            client.set_tag(plan.parent_run_id, TAG_REGISTERED, result.registered)
        elif plan.register_best:
            say("warning: --register-best: no trial finished with a value; nothing registered")
    result.seconds = time.perf_counter() - t0
    return result


def _log_sweep_dataset(client: Any, plan: SweepPlan) -> None:
    """The trials' dataset as the parent run's input, logged before any trial starts. Every trial's
    run logs it too (``aigc.tracking.lineage.log_dataset_input``), and MLflow 3.17 inserts the
    experiment's dataset row on first use: two trials opening their runs at once both inserted it
    and one failed, FAILED before training, with "UNIQUE constraint failed: datasets.experiment_id,
    datasets.name, datasets.digest" (sqlite store). With the row already there they only link it."""
    from aigc import tracking
    from aigc.data.version import version
    from aigc.training.job import data_location, dataset_manifest

    cfg = load_config(plan.config, plan.overrides)
    location = data_location(cfg, Path(plan.root))
    name = dataset_manifest(location).get("name", cfg.data.name)
    tracking.log_dataset_input(client, plan.parent_run_id, name, location, version(location))


def _grid_note(plan: SweepPlan) -> str:
    size = math.prod(len(s.args) for s in plan.specs() if s.kind == "grid")
    return f" x {size} grid points = {plan.trials * size}" if size > 1 else ""


def _parent_params(plan: SweepPlan) -> dict[str, Any]:
    """The parent run's params: the space (``space.<key>``) and how it is searched."""
    return {
        **{f"space.{k}": v for k, v in plan.params.items()},
        "sweep.config": plan.config,
        "sweep.scheduler": plan.scheduler,
        "sweep.metric": plan.metric,
        "sweep.mode": plan.mode,
        "sweep.trials": plan.trials,
        "sweep.concurrent": plan.concurrent,
        "sweep.seed": plan.seed,
        "sweep.overrides": " ".join(plan.overrides) or "-",
        **(
            {
                "sweep.grace_period": plan.grace_period,
                "sweep.reduction_factor": plan.reduction_factor,
                "sweep.max_t": plan.max_steps,
            }
            if plan.scheduler == "asha"
            else {}
        ),
    }


def _description(plan: SweepPlan) -> str:
    rows = "\n".join(f"| `{k}` | `{v}` |" for k, v in plan.params.items())
    return (
        f"Sweep `{plan.name}` of `{Path(plan.config).name}`: {plan.trials} trial(s), {plan.concurrent} at a "
        f"time, scheduler {plan.scheduler}, {plan.mode} `{plan.metric}`. The trials are the nested runs.\n\n"
        f"| param | space |\n| --- | --- |\n{rows}\n"
    )


def _check_fits(plan: SweepPlan) -> None:
    """``concurrent`` trial jobs at once must fit in the cluster's CPUs, else the last trial's Ray
    Train workers wait for a placement that never comes and the job fails on its start timeout."""
    import ray

    cfg = load_config(plan.config, plan.overrides)
    workers = plan.workers or cfg.scaling.max_workers
    need = plan.concurrent * workers * cfg.scaling.cpus_per_worker
    have = ray.cluster_resources().get("CPU", 0.0)
    if need > have:
        raise SweepError(
            f"{plan.concurrent} concurrent trial(s) of {workers} worker(s) x {cfg.scaling.cpus_per_worker:g} "
            f"CPU need {need:g} CPUs; the Ray cluster has {have:g}: lower --concurrent or --workers"
        )


def _tune(plan: SweepPlan, say: Say) -> None:
    """The Tune run: a fresh ``Tuner`` for a new sweep and for a resumed one alike (module doc)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    # Ctrl-C reaches this driver as KeyboardInterrupt (Tune's own handler would end fit() quietly,
    # its trials cut off).
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: no Tune tables; ours instead
    scheduler = None
    if plan.scheduler == "asha":
        scheduler = ASHAScheduler(
            time_attr="step",
            metric=SCORE,
            mode=plan.mode,
            max_t=plan.max_steps,
            grace_period=plan.grace_period or 1,
            reduction_factor=plan.reduction_factor,
            # The job ends itself at max_steps and then evaluates and closes its run: not stopped there.
            stop_last_trials=False,
        )
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, plan_json=plan.model_dump_json()),
        # The actor waits on its job; the job's workers hold the CPUs (module doc). {"cpu": 0} alone
        # is refused by ray 2.60 ("Cannot initialize a ResourceRequest with an empty head and zero
        # worker bundles"): the actor reserves some memory instead, which every Ray node has.
        {"cpu": 0, "memory": TRIAL_ACTOR_MEMORY},
    )
    tuner = tune.Tuner(
        trainable,
        param_space={s.key: s.domain() for s in plan.specs()},
        tune_config=tune.TuneConfig(
            num_samples=plan.trials,
            max_concurrent_trials=plan.concurrent,
            scheduler=scheduler,
            # The seed makes a resumed sweep draw the same trials. Tune ignores
            # TuneConfig.max_concurrent_trials once a search_alg is given (ray 2.60 warns "requires a
            # Searcher instance"): the generator takes the limit itself.
            search_alg=BasicVariantGenerator(random_state=plan.seed, max_concurrent=plan.concurrent),
            reuse_actors=False,
        ),
        run_config=tune.RunConfig(
            name=plan.name,
            storage_path=plan.storage,
            verbose=0,
            callbacks=[_SweepCallback(plan, say)],
            failure_config=tune.FailureConfig(max_failures=0),
        ),
    )
    tuner.fit()


class _SweepCallback:
    """Tune's events in the driver: progress lines, and a stopped trial's run marked KILLED.

    (Built lazily as a ``ray.tune.Callback`` subclass, so this module imports without Ray Tune.)"""

    def __new__(cls, plan: SweepPlan, say: Say):
        from ray import tune

        class SweepCallback(tune.Callback):
            def __init__(self) -> None:
                self.plan, self.say = plan, say
                self.latest: dict[str, tuple[int, float]] = {}
                self.best: tuple[str, float] | None = None

            def _name(self, trial) -> str:
                return plan.trial_name(trial_index(trial.trial_id))

            def on_trial_start(self, iteration, trials, trial, **info):
                values = ", ".join(f"{k}={_plain(trial.config.get(k))}" for k in plan.params)
                self.say(f"[{self._name(trial)}] started: {values}")

            def on_trial_result(self, iteration, trials, trial, result, **info):
                name, value = self._name(trial), float(result.get("value", float("nan")))
                if result.get(FINISHED) is not None:
                    return  # repeated at the end; reported by on_trial_complete
                self.latest[name] = (int(result["step"]), value)
                better = self.best is None or (
                    math.isfinite(value)
                    and (value < self.best[1] if plan.mode == "min" else value > self.best[1])
                )
                if better and math.isfinite(value):
                    self.best = (name, value)
                best = f"{self.best[0]} {self.best[1]:.4g}" if self.best else "-"
                shown = (
                    f"{value:.4g}" if math.isfinite(value) else f"{value} (diverged: train/loss not finite)"
                )
                self.say(f"[{name}] step {result['step']}: {plan.metric} {shown}  (best so far: {best})")

            def on_trial_complete(self, iteration, trials, trial, **info):
                name, last = self._name(trial), trial.last_result or {}
                value = last.get("value")
                shown = (
                    f"{plan.metric} {value:.4g} at step {last.get('step')}"
                    if value is not None
                    else (f"no {plan.metric} logged")
                )
                if last.get(FINISHED):
                    self.say(f"[{name}] finished: {shown}")
                    return
                run_id = last.get("run_id")
                if run_id and _mark_stopped(plan, run_id, int(last.get("step", 0))):
                    self.say(f"[{name}] stopped by {plan.scheduler} at step {last.get('step')}: {shown}")

            def on_trial_error(self, iteration, trials, trial, **info):
                self.say(f"[{self._name(trial)}] failed (its run is FAILED; see its aigc.error tag)")

        return SweepCallback()


def _mark_stopped(plan: SweepPlan, run_id: str, step: int) -> bool:
    """A trial the scheduler stopped: its run marked KILLED with ``aigc.sweep.stopped=<scheduler>``.

    The run is RUNNING when Tune ends the trial's actor, or FAILED already: the Ray Train controller
    the actor owns can die first, and ``train()``'s guard, still alive on its thread, then ends the
    run FAILED ("controller died") before the actor goes; or it does so just after this mark
    (:func:`_settle_stopped` corrects it once Tune is done). A FINISHED run, or a KILLED one (its
    history replayed on a resume), is left as it is."""
    from aigc import tracking

    client = tracking.client_for(plan.tracking_uri)
    run = client.get_run(run_id)
    if run.info.status not in ("RUNNING", "FAILED"):
        return False
    client.set_tag(run_id, TAG_STOPPED, plan.scheduler)
    client.set_tag(run_id, "aigc.sweep.stopped_at_step", str(step))
    _end_stopped(client, plan, run)
    return True


def _end_stopped(client: Any, plan: SweepPlan, run: Any) -> None:
    from aigc import tracking

    if "aigc.error" in run.data.tags:
        client.delete_tag(run.info.run_id, "aigc.error")  # the error was the stop itself
    tracking.end_job_run(plan.tracking_uri, run.info.run_id, "KILLED")


def _settle_stopped(client: Any, plan: SweepPlan) -> None:
    """Once Tune is done (every trial actor gone): a stopped trial's run that its dying job ended
    FAILED after :func:`_mark_stopped` is KILLED again."""
    for run in _child_runs(client, plan):
        if TAG_STOPPED in run.data.tags and run.info.status != "KILLED":
            _end_stopped(client, plan, run)


def _child_runs(client: Any, plan: SweepPlan) -> list[Any]:
    from aigc.tracking.context import TAG_PARENT_RUN

    experiment = client.get_experiment_by_name(plan.experiment)
    return client.search_runs(
        [experiment.experiment_id], f"tags.`{TAG_PARENT_RUN}` = '{plan.parent_run_id}'", max_results=10000
    )


def _close_cut_off_trials(client: Any, plan: SweepPlan) -> None:
    """Runs of trials still RUNNING once Tune is done, or the driver is interrupted: their actors
    are gone with the driver's Tune loop, so they are marked KILLED (``--resume`` continues them)."""
    from aigc import tracking

    try:
        for run in _child_runs(client, plan):
            if run.info.status == "RUNNING":
                tracking.end_job_run(plan.tracking_uri, run.info.run_id, "KILLED")
    except Exception:  # noqa: BLE001 - best effort on the way out; the resume reopens them anyway
        pass


def _collect(client: Any, plan: SweepPlan, experiment_id: str) -> SweepResult:
    """The table of trials from their MLflow runs, and the best: among the FINISHED trials with a
    finite value, the lowest (``mode`` min) or highest value of ``metric`` at its last step (the
    value the MLflow compare view shows)."""
    result = SweepResult(
        name=plan.name,
        parent_run_id=plan.parent_run_id,
        experiment_id=experiment_id,
        tracking_uri=plan.tracking_uri,
        metric=plan.metric,
        mode=plan.mode,
        keys=list(plan.params),
    )
    for run in _child_runs(client, plan):
        history = _history(client, run.info.run_id, plan.metric)
        status = run.info.status
        if status == "KILLED" and TAG_STOPPED in run.data.tags:
            status = "STOPPED"
        result.trials.append(
            TrialRow(
                name=run.data.tags.get(TAG_RUN_NAME, run.info.run_name),
                run_id=run.info.run_id,
                status=status,
                params={k: run.data.params.get(k, "?") for k in plan.params},
                value=history[-1][1] if history else None,
                step=history[-1][0] if history else None,
            )
        )
    result.trials.sort(key=lambda t: t.name)
    done = [
        t for t in result.trials if t.status == "FINISHED" and t.value is not None and math.isfinite(t.value)
    ]
    if done:
        pick = min if plan.mode == "min" else max
        result.best = pick(done, key=lambda t: t.value)  # type: ignore[arg-type, return-value]
    return result


def _record_best(client: Any, plan: SweepPlan, result: SweepResult) -> None:
    """The parent run's outcome: the best trial and value (tags, and metric ``best/<metric>``) and
    how many trials ended each way."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    counts = {
        s: sum(t.status == s for t in result.trials) for s in ("FINISHED", "STOPPED", "FAILED", "KILLED")
    }
    metrics = [Metric(f"sweep/trials_{s.lower()}", float(n), now, 0) for s, n in counts.items()]
    tags = {}
    if result.best is not None:
        metrics.append(
            Metric(f"best/{plan.metric}", float(result.best.value or 0.0), now, result.best.step or 0)
        )
        tags = {
            TAG_BEST_TRIAL: result.best.name,
            TAG_BEST_RUN: result.best.run_id,
            TAG_BEST_VALUE: repr(result.best.value),
        }
    from mlflow.entities import RunTag

    client.log_batch(plan.parent_run_id, metrics=metrics, tags=[RunTag(k, v) for k, v in tags.items()])


def format_table(result: SweepResult) -> str:
    """The sweep's trials as a text table, then the best."""
    headers = ["trial", "status", *result.keys, result.metric, "step"]
    rows = [
        [
            t.name,
            t.status,
            *(t.params.get(k, "?") for k in result.keys),
            "-" if t.value is None else f"{t.value:.4g}",
            "-" if t.step is None else str(t.step),
        ]
        for t in result.trials
    ]
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=False)]
    lines = [
        "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=False)).rstrip() for r in [headers, *rows]
    ]
    b = result.best
    if b is not None:
        lines.append(f"best: {b.name} ({b.run_id}) {result.metric} {b.value:.4g} at step {b.step}")
    else:
        lines.append(f"best: none (no trial finished with a {result.metric} value)")
    return "\n".join(lines)

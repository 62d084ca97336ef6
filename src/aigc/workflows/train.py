"""``aigc train``: a training job, then its finished run registered as the ``candidate`` version.

Training and registering are two layers (:mod:`aigc.training` below :mod:`aigc.registry`); this is
where they meet, so that ``aigc.training.train`` stays usable without the registry.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from aigc.config import RunConfig
from aigc.models.init import InitSource, export_source
from aigc.training import TrainError, TrainRequest, TrainResult, train
from aigc.training.launcher import Messages, Progress, to_stderr, write_metrics

__all__ = ["train_and_register"]


def train_and_register(
    request: TrainRequest | str | Path | RunConfig | None = None,
    overrides: list[str] | None = None,
    *,
    progress: Progress | None = None,
    messages: Messages | None = to_stderr,
    **options: Any,
) -> TrainResult:
    """:func:`aigc.training.train`, then with ``register`` (the default) the finished run's final
    checkpoint registered as the ``candidate`` version of ``aigc-<family>``
    (:func:`aigc.registry.register.register_run`); ``TrainResult.registered`` names the version.

    The arguments are :func:`aigc.training.train`'s. A failed registration raises ``TrainError``
    after the run is recorded FINISHED, with the command that retries it.
    """
    request = TrainRequest.of(request, overrides, **options)
    if not request.register:
        return train(request, progress=progress, messages=messages, resolve_init=resolve_init)
    # --metrics-out is written once the run is registered: a failed registration leaves no record
    # for DVC of a stage that failed.
    out = train(
        replace(request, metrics_out=None), progress=progress, messages=messages, resolve_init=resolve_init
    )
    t0 = time.perf_counter()
    if out.checkpoint:
        out.registered = _register(out, messages)
    out.seconds += time.perf_counter() - t0
    if request.metrics_out:
        write_metrics(request.metrics_out, out)
    return out


def resolve_init(ref: str, tracking_uri: str, dst: Path, say: Messages) -> InitSource:
    """``--init-from REF`` as an export folder to start from (``aigc.training.train``'s
    ``resolve_init``): REF is anything :func:`aigc.workflows.model_ref.resolve_model` takes (a
    registered version, a run's id or name or ``--metrics-out`` record, an export folder or ``.ckpt``);
    what is not an export folder already is exported into ``dst``."""
    from aigc.contract import EXPORT_FILES, TAG_INIT_FROM, TAG_INIT_MODEL, TAG_INIT_RUN_ID, TAG_INIT_VERSION
    from aigc.models.export import export_model
    from aigc.workflows.model_ref import ModelRefError, resolve_model

    local = Path(ref).expanduser()
    if local.is_dir() and all((local / f).is_file() for f in EXPORT_FILES):
        return export_source(ref)
    try:
        module, lineage = resolve_model(ref, tracking_uri, say, option="--init-from")
    except (ModelRefError, OSError) as err:
        raise TrainError(str(err)) from None
    if module.needs_base:
        raise TrainError(
            f"--init-from {ref}: a LoRA adapter; start from its base model ({module.family}), or from a "
            "model fine-tuned fully (starting from an adapter merged into its base is not supported yet)"
        )
    path = export_model(module, Path(dst) / "export")
    tags = {TAG_INIT_FROM: ref}
    for tag, key in ((TAG_INIT_MODEL, "model"), (TAG_INIT_VERSION, "version"), (TAG_INIT_RUN_ID, "run_id")):
        if lineage.get(key):
            tags[tag] = str(lineage[key])
    if "model" in lineage:
        label = f"{lineage['model']} v{lineage['version']}"
    elif "run_id" in lineage:
        label = f"run {lineage['run_id']}"
    else:
        label = lineage.get("path", ref)
    return InitSource(path=path, ref=ref, label=label, tags=tags)


def _register(out: TrainResult, messages: Messages | None) -> str:
    """Register the finished run (``aigc register``); the run stays FINISHED whatever happens here."""
    from aigc.registry.register import register_run

    try:
        r = register_run(out.run_id, out.tracking_uri, progress=messages)
    except Exception as err:  # noqa: BLE001 - reported with the way to retry
        raise TrainError(
            f"run {out.name} ({out.run_id}) FINISHED, but registering it failed: {err}. "
            f"Retry with `aigc register {out.run_id}`."
        ) from err
    return f"{r.name}/{r.version}"

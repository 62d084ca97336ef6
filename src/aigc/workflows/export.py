"""``aigc export``: a model named the way a user has it at hand, written as a folder to take away.

The model is resolved by :func:`aigc.workflows.model_ref.resolve_model` (a registered version, a
run's id or name or ``--metrics-out`` record, an export folder or ``.ckpt``) and written as:

- an aigc export folder (``weights.safetensors``, ``config.json``, ``tokenizer.json``;
  :func:`aigc.models.export.export_model`), what the registry and serving load; or, with
  ``diffusers``, for the ``sd`` family only,
- the diffusers layout (:func:`aigc.models.sd.export_diffusers`): the whole pipeline folder that
  ``StableDiffusionPipeline.from_pretrained`` loads, or for a LoRA model the adapter alone
  (``pytorch_lora_weights.safetensors`` + ``aigc-base.json``, for ``pipe.load_lora_weights``).

``merge`` (a LoRA model only) merges the adapters into the base weights: a whole diffusers pipeline
with ``diffusers``, else an aigc export of the merged model, which no longer has ``model.lora``.
The folder is written under a temporary name and swapped in whole; an existing one needs
``overwrite``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aigc.data.staging import StagedFolder

__all__ = ["ExportError", "ExportResult", "export_ref"]

Progress = Callable[[str], None]


class ExportError(ValueError):
    """An export that cannot be made of this model; the message says why."""


@dataclass
class ExportResult:
    path: Path
    family: str
    #: "aigc" (export folder), "diffusers" (whole pipeline folder) or "diffusers-lora" (the adapter)
    layout: str
    merged: bool
    lineage: dict[str, Any] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    bytes: int = 0
    seconds: float = 0.0


def _lora(module: Any) -> Any:
    return getattr(module.model_cfg, "lora", None)


def export_ref(
    ref: str,
    out: str | os.PathLike[str],
    *,
    diffusers: bool = False,
    merge: bool = False,
    overwrite: bool = False,
    tracking_uri: str | None = None,
    progress: Progress | None = None,
) -> ExportResult:
    """Write the model ``ref`` names into the folder ``out`` (see the module docstring).

    Raises :class:`ExportError` for ``diffusers`` on a family other than ``sd`` (naming it) and for
    ``merge`` on a model without LoRA adapters, ``ModelRefError`` (a ``ValueError``) for a reference
    that names nothing loadable, and ``DatasetError`` for an existing ``out`` without ``overwrite``.
    """
    from aigc.workflows.model_ref import resolve_model

    start = time.perf_counter()
    say = progress or (lambda _m: None)
    staging = StagedFolder(out, overwrite=overwrite, action="re-export")  # refuses before loading
    module, lineage = resolve_model(ref, tracking_uri, say, option="model")
    family = module.family
    if diffusers and family != "sd":
        raise ExportError(
            f"{ref} is a {family} model: --diffusers writes the diffusers layout of the sd family "
            "(a Stable-Diffusion-format pipeline) only; leave it out for the aigc export folder"
        )
    if merge and _lora(module) is None:
        raise ExportError(
            f"{ref} has no LoRA adapters (its model.lora is not set): there is nothing to --merge; "
            "leave --merge out"
        )
    with staging as tmp:
        if diffusers:
            from aigc.models.sd import export_diffusers

            export_diffusers(module, tmp, merge=merge)
            layout = "diffusers" if merge or _lora(module) is None else "diffusers-lora"
        else:
            from aigc.models.export import export_model

            if merge:
                module = _merged(module, ref)
            export_model(module, tmp)
            layout = "aigc"
    target = staging.target
    files = sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file())
    size = sum((target / f).stat().st_size for f in files)
    return ExportResult(
        path=target,
        family=family,
        layout=layout,
        merged=merge,
        lineage=lineage,
        files=files,
        bytes=size,
        seconds=time.perf_counter() - start,
    )


def _merged(module: Any, ref: str) -> Any:
    """The LoRA model as one without adapters, its weights merged (the family's own merge)."""
    if module.family == "sd":
        from aigc.models.sd import merged_module

        return merged_module(module)
    if module.needs_base:  # LoRA on aigc's own families
        from aigc.models.lora import merged_module as merged_lora

        return merged_lora(module)
    raise ExportError(
        f"{ref}: merging the LoRA adapters of a {module.family} model into an aigc export is not "
        "supported; export it without --merge (the adapter and its base reference)"
    )

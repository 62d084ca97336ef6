"""Registered models: names, references (``aigc-diffusion@production``), and loading a version.

A model of family F is registered as ``aigc-F``. A reference names a version by alias
(``aigc-F@production``), by number (``aigc-F/3``) or as an MLflow URI (``models:/aigc-F@production``).
Loading goes through the version's export folder (safetensors + JSON): no pickle on this path.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aigc.contract import (  # noqa: F401 - re-exported for aigc.registry
    ALIAS_CANDIDATE,
    ALIAS_PREVIOUS,
    ALIAS_PRODUCTION,
    MODEL_PREFIX,
    MODEL_REF,
    TAG_ELIGIBLE,
    TAG_INELIGIBLE_REASON,
    TAG_RUN_ID,
)
from aigc.tracking.backend import client_for  # noqa: F401 - the one client factory, used with the registry

#: the key of the export folder in a registered model's artifacts (the pyfunc's ``artifacts``)
EXPORT_ARTIFACT = "export"


class RegistryError(RuntimeError):
    """A registry operation that cannot be done; the message says why and what to do."""


@dataclass(frozen=True)
class ModelRef:
    name: str
    alias: str | None = None
    version: str | None = None

    def __str__(self) -> str:
        if self.alias:
            return f"{self.name}@{self.alias}"
        return f"{self.name}/{self.version}" if self.version else self.name


def model_name(family: str) -> str:
    """The registered model name of a family: ``aigc-<family>``."""
    return f"{MODEL_PREFIX}{family}"


def parse_ref(ref: str, default_alias: str | None = ALIAS_PRODUCTION) -> ModelRef:
    """``aigc-F@alias`` | ``aigc-F/N`` | ``models:/...`` | ``aigc-F`` (-> ``default_alias``)."""
    m = MODEL_REF.match(ref.strip())
    if not m:
        raise RegistryError(
            f"model reference {ref!r}: expected NAME@ALIAS, NAME/VERSION or models:/NAME@ALIAS, "
            "e.g. aigc-diffusion@production"
        )
    alias, version = m["alias"], m["version"]
    if alias is None and version is None:
        alias = default_alias
    return ModelRef(m["name"], alias, version)


def resolve_version(client: Any, ref: ModelRef | str):
    """The ``ModelVersion`` a reference names; ``RegistryError`` naming what exists when it is absent."""
    from mlflow.exceptions import MlflowException

    ref = parse_ref(ref) if isinstance(ref, str) else ref
    try:
        if ref.version is not None:
            return client.get_model_version(ref.name, ref.version)
        if ref.alias is None:
            raise RegistryError(f"{ref}: name a version (NAME/N) or an alias (NAME@ALIAS)")
        return client.get_model_version_by_alias(ref.name, ref.alias)
    except MlflowException as err:
        try:
            model = client.get_registered_model(ref.name)
        except MlflowException as missing:
            if missing.error_code != "RESOURCE_DOES_NOT_EXIST":  # the store itself failed: say so
                raise RegistryError(
                    f"the registry at {client.tracking_uri} failed: {missing.message}"
                ) from None
            raise RegistryError(
                f"no registered model {ref.name!r} (register one: aigc register RUN)"
            ) from None
        aliases = ", ".join(f"{a}->v{v}" for a, v in sorted(model.aliases.items())) or "none"
        raise RegistryError(f"{ref}: not found ({err.message}); aliases of {ref.name}: {aliases}") from None


def download_export(client: Any, version: Any, dst: str | Path) -> Path:
    """Download a version's export folder (``weights.safetensors``, ``config.json``,
    ``tokenizer.json``) into the folder ``dst``; returns the export folder."""
    import mlflow.artifacts

    local = mlflow.artifacts.download_artifacts(
        artifact_uri=f"{model_location(client, version)}/artifacts/{EXPORT_ARTIFACT}",
        dst_path=str(dst),
        tracking_uri=client.tracking_uri,
    )
    return Path(local)


def model_location(client: Any, version: Any) -> str:
    """The artifact URI of a version's logged model (the folder holding ``MLmodel``).

    A version registered from MLflow 3's ``models:/m-<id>`` URI is looked up as that logged model
    (``download_artifacts`` would read ``m-<id>`` as a registered model's name)."""
    source = version.source.rstrip("/")
    if source.startswith("models:/m-"):
        return client.get_logged_model(source.removeprefix("models:/")).artifact_location.rstrip("/")
    return source


def load_version(client: Any, version: Any, map_location: str = "cpu"):
    """The family module of a registered version, from its export (safetensors + JSON only); a LoRA
    adapter's version loads onto the base version its export names."""
    with tempfile.TemporaryDirectory(prefix="aigc-export-") as tmp:
        return load_export_folder(client, download_export(client, version, Path(tmp) / "model"), map_location)


def load_export_folder(client: Any, path: Path, map_location: str = "cpu"):
    """:func:`aigc.models.export.load_export` of a registered model's export folder, with the base
    version a LoRA adapter's ``config.json`` names downloaded from this registry and loaded first."""
    import json

    from aigc.models.export import load_export

    base = json.loads((path / "config.json").read_text(encoding="utf-8")).get("base")
    if not base:
        return load_export(path, map_location)
    if not base.get("model") or not base.get("version"):
        raise RegistryError(f"{path}: a LoRA adapter whose base is not a registered version ({base})")
    base_version = resolve_version(client, ModelRef(base["model"], version=str(base["version"])))
    with tempfile.TemporaryDirectory(prefix="aigc-base-") as tmp:
        return load_export(path, map_location, base=download_export(client, base_version, tmp))

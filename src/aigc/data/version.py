"""The data version of a shard folder: DVC's md5 of it, or the manifest digest.

DVC records a tracked folder's hash as ``<md5>.dir`` in the ``outs`` of ``dvc.lock`` (for a
pipeline output) or of ``<folder>.dvc`` (for ``dvc add``). Both are read as plain YAML, which is
much faster than importing dvc. The value is what DVC *recorded* at the last ``repro``/``add``/
``commit``; ``aigc data verify`` tells whether the files still match the manifest.

:func:`version` is the one definition of the data version: the loader, the evaluator and the CLI
all call it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from aigc.data.manifest import MANIFEST_NAME, read_manifest

__all__ = ["version", "dvc_md5", "find_dvc_root"]


def find_dvc_root(path: str | Path) -> Path | None:
    """The nearest folder at or above ``path`` holding a ``.dvc/`` folder, or None."""
    path = Path(path).absolute()
    for folder in (path, *path.parents):
        if (folder / ".dvc").is_dir():
            return folder
    return None


def _norm(path: Path) -> Path:
    return Path(os.path.normpath(path.absolute()))


def _load(file: Path) -> Any:
    try:
        return yaml.safe_load(file.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None


def _md5_from_outs(outs: Any, base: Path, target: Path) -> str | None:
    if not isinstance(outs, list):
        return None
    for out in outs:
        ok = isinstance(out, dict) and isinstance(out.get("path"), str) and out.get("md5")
        if ok and _norm(base / out["path"]) == target:
            return str(out["md5"])
    return None


def dvc_md5(path: str | Path) -> str | None:
    """The md5 (``...dir`` for a folder) DVC recorded for ``path``, or None if DVC does not track it."""
    target = _norm(Path(path))
    root = find_dvc_root(target)
    if root is None:
        return None
    # A folder added with ``dvc add`` has ``<folder>.dvc`` beside it.
    dvcfile = _load(target.with_name(target.name + ".dvc"))
    if isinstance(dvcfile, dict):
        md5 = _md5_from_outs(dvcfile.get("outs"), target.parent, target)
        if md5:
            return md5
    # A stage output is listed in the dvc.lock next to its dvc.yaml, at or above the folder.
    for folder in target.parents:
        lock = _load(folder / "dvc.lock")
        if isinstance(lock, dict) and isinstance(lock.get("stages"), dict):
            for stage in lock["stages"].values():
                md5 = _md5_from_outs(stage.get("outs") if isinstance(stage, dict) else None, folder, target)
                if md5:
                    return md5
        if folder == root:
            break
    return None


def version(location: str | os.PathLike[str]) -> str:
    """The data version of a dataset: DVC's md5 of its folder (with the ``.dir`` suffix) when DVC
    tracks it, else its manifest digest.

    ``location`` is what :func:`~aigc.data.manifest.read_manifest` takes: a folder, its
    ``manifest.json`` or an fsspec URL. A ``file://`` URL is a local folder; any other URL gets the
    manifest digest, since DVC's files cannot be read through it.
    """
    loc = os.fspath(location)
    scheme, sep, rest = loc.partition("://")
    if sep and scheme != "file":
        return read_manifest(loc)["digest"]
    folder = Path(rest if sep else loc)
    if folder.name == MANIFEST_NAME:
        folder = folder.parent
    return dvc_md5(folder) or read_manifest(folder)["digest"]

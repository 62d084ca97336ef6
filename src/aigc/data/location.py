"""Where a dataset lives: the one rule every command, the loader and the launcher follow.

A dataset named by a config's ``data`` section is at ``<project root>/<data.root>/<data.name>``
(:func:`dataset_path`: where ``aigc data build`` writes it) unless ``data.location`` names another
folder or an fsspec URL to stream from (:func:`resolve_location`: what training reads). Relative
local paths resolve against the project root (:func:`aigc.project_root`), like every other path in
the configs, and become absolute, because Ray workers run in another working directory.
"""

from __future__ import annotations

import os
from pathlib import Path

from aigc import project_root
from aigc.config import DataConfig
from aigc.data.manifest import DatasetError

__all__ = ["check_location", "dataset_path", "resolve_location"]


def check_location(location: str) -> str:
    """Reject locations that would run a command (and empty ones) with a :class:`DatasetError`;
    return the location stripped of whitespace."""
    loc = str(location).strip()
    if loc.lower().startswith("pipe:"):
        raise DatasetError(
            f"shard location {loc!r}: 'pipe:' URLs run a shell command and are not accepted; "
            "give a folder path or an fsspec URL (s3://, gs://, https://, file://)"
        )
    if not loc:
        raise DatasetError("shard location is empty")
    return loc


def _absolute(path: str | os.PathLike[str], root: Path) -> Path:
    # normpath, not resolve(): a symlinked datasets/ keeps the path under the project, which is
    # where DVC's records (aigc.data.version) look for the folder.
    return Path(os.path.normpath(root / Path(path).expanduser()))


def dataset_path(cfg: DataConfig, root: str | os.PathLike[str] | None = None) -> Path:
    """``<root>/<cfg.root>/<cfg.name>``, the folder the project keeps the dataset ``cfg`` names in
    (``cfg.root`` may be absolute). ``root`` is the project root, by default :func:`aigc.project_root`."""
    base = Path(root) if root is not None else project_root()
    return _absolute(Path(cfg.root) / cfg.name, base.absolute())


def resolve_location(
    cfg: DataConfig,
    location: str | os.PathLike[str] | None = None,
    root: str | os.PathLike[str] | None = None,
) -> str:
    """The shard folder to read: ``location``, else ``cfg.location``, else :func:`dataset_path`.

    A URL is kept as it is; a local path is made absolute against ``root`` (the project root by
    default). ``pipe:`` locations are rejected (:func:`check_location`).
    """
    loc = location if location is not None else cfg.location
    if loc is None:
        return str(dataset_path(cfg, root))
    loc = check_location(os.fspath(loc))
    if "://" in loc:
        return loc
    return str(_absolute(loc, Path(root).absolute() if root is not None else project_root()))

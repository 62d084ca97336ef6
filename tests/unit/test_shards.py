"""Shard names, the ShardWriter, the manifest, verify, and config errors of `aigc data build`."""

from __future__ import annotations

import json
import re
import shutil
import tarfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from aigc.cli import app
from aigc.config import ConfigError, load_data_config
from aigc.data import (
    DatasetError,
    Sample,
    ShardWriter,
    compute_digest,
    read_manifest,
    shard_name,
    verify_dataset,
    version,
)
from aigc.data.manifest import DatasetNotFound, sha256_file, shard_location
from aigc.data.sources import choose_val_keys


def make_sample(i: int, payload: int = 10) -> Sample:
    return Sample(f"s-{i:06d}", bytes([i % 256]) * payload, "png", f"caption {i}", {"label": i % 10})


# ------------------------------------------------------------------------------------------- names


def test_shard_names():
    assert shard_name("train", 0) == "train-000000.tar"
    assert shard_name("val", 123) == "val-000123.tar"
    with pytest.raises(ValueError, match="split"):
        shard_name("test", 0)
    with pytest.raises(ValueError):
        shard_name("train", -1)


@pytest.mark.parametrize("key", ["a.b", "", "x/y"])
def test_sample_keys_without_dots(key):
    with pytest.raises(ValueError, match="key"):
        Sample(key, b"x", "png", "c", {})


# ------------------------------------------------------------------------------------------ writer


def test_writer_rolls_over_by_count(tmp_path):
    seen = []
    with ShardWriter(tmp_path, "train", samples_per_shard=3, on_shard=lambda s, i: seen.append(i.name)) as w:
        for i in range(7):
            w.write(make_sample(i))
    assert [s.num_samples for s in w.shards] == [3, 3, 1]
    assert seen == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert sorted(p.name for p in tmp_path.iterdir()) == seen  # no .tmp left behind
    for info in w.shards:
        assert sha256_file(tmp_path / info.name) == info.sha256
        assert (tmp_path / info.name).stat().st_size == info.bytes


def test_writer_rolls_over_by_bytes(tmp_path):
    limit = 40 * 1024
    with ShardWriter(tmp_path, "val", samples_per_shard=1000, max_shard_bytes=limit) as w:
        for i in range(12):
            w.write(make_sample(i, payload=9000))
    assert len(w.shards) > 1
    assert sum(s.num_samples for s in w.shards) == 12
    assert all(s.bytes <= limit for s in w.shards)
    # A sample bigger than the limit still gets written, alone in its shard.
    with ShardWriter(tmp_path / "big", "train", max_shard_bytes=1024) as w:
        w.write(make_sample(0, payload=5000))
        w.write(make_sample(1, payload=5000))
    assert [s.num_samples for s in w.shards] == [1, 1]


def test_tar_members_are_sorted_with_fixed_metadata(tmp_path):
    with ShardWriter(tmp_path, "train") as w:
        w.write(make_sample(1))
        w.write(make_sample(2))
    with tarfile.open(tmp_path / "train-000000.tar") as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == [
            "s-000001.json",
            "s-000001.png",
            "s-000001.txt",
            "s-000002.json",
            "s-000002.png",
            "s-000002.txt",
        ]
        assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {
            (0, 0, 0, "", "", 0o644)
        }
        assert tar.extractfile("s-000002.txt").read() == b"caption 2"
        assert tar.extractfile("s-000002.json").read() == b'{"label":2}'


def test_same_samples_give_identical_bytes(tmp_path):
    for name in ("a", "b"):
        with ShardWriter(tmp_path / name, "train", samples_per_shard=4) as w:
            for i in range(10):
                w.write(make_sample(i))
    for shard in ("train-000000.tar", "train-000001.tar", "train-000002.tar"):
        assert (tmp_path / "a" / shard).read_bytes() == (tmp_path / "b" / shard).read_bytes()


def test_abort_removes_partial_shard_and_duplicate_keys_fail(tmp_path):
    with (
        pytest.raises(DatasetError, match="duplicate"),
        ShardWriter(tmp_path, "train", samples_per_shard=2) as w,
    ):
        w.write(make_sample(0))
        w.write(make_sample(1))
        w.write(make_sample(2))
        w.write(make_sample(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-000000.tar"]


def test_val_split_is_seeded_and_sized():
    keys = [f"k-{i:04d}" for i in range(1797)]
    val = choose_val_keys(keys, 0.1, seed=0)
    assert len(val) == 180 and val <= set(keys)
    assert choose_val_keys(list(reversed(keys)), 0.1, seed=0) == val
    assert choose_val_keys(keys, 0.1, seed=1) != val
    assert len(choose_val_keys(keys[:2], 0.01, 0)) == 1
    assert choose_val_keys(keys[:1], 0.5, 0) == set()


# ---------------------------------------------------------------------------------------- manifest


def test_manifest_content(digits_dataset):
    m = read_manifest(digits_dataset)
    assert m["format"] == "aigc-shards/1" and m["name"] == "digits"
    assert m["image_size"] == 8 and m["channels"] == 1
    assert m["source"]["type"] == "digits" and m["source"]["path"] is None
    assert m["source"]["caption_templates"] == 6
    assert m["skipped"] == {"unreadable": 0, "missing_caption": 0, "failed_status": 0}
    train, val = m["splits"]["train"], m["splits"]["val"]
    assert (train["num_samples"], val["num_samples"]) == (1617, 180)
    assert [s["name"] for s in train["shards"]] == [f"train-{i:06d}.tar" for i in range(17)]
    assert [s["name"] for s in val["shards"]] == ["val-000000.tar", "val-000001.tar"]
    assert all(s["num_samples"] == 100 for s in train["shards"][:-1])
    assert sum(s["num_samples"] for s in train["shards"]) == 1617
    for split in (train, val):
        for s in split["shards"]:
            assert sha256_file(digits_dataset / s["name"]) == s["sha256"]
    assert re.fullmatch(r"[0-9a-f]{32}", m["digest"])
    assert m["digest"] == compute_digest(m["splits"])
    assert sorted(p.name for p in digits_dataset.iterdir()) == sorted(
        ["manifest.json"] + [s["name"] for s in train["shards"] + val["shards"]]
    )


def test_read_manifest_names_the_folder(tmp_path):
    with pytest.raises(DatasetError, match=re.escape(str(tmp_path))):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        read_manifest(tmp_path)


def _write_json(folder: Path, doc: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps(doc))
    return folder


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"channels": 2}, "channels is 2"),
        ({"channels": True}, "channels is True"),
        ({"image_size": 8.0}, "image_size is 8.0"),
        ({"format": "webdataset"}, "format 'webdataset'"),
        ({"source": "digits"}, "source is not a JSON object"),
    ],
)
def test_read_manifest_rejects_what_is_not_an_aigc_manifest(digits_dataset, tmp_path, change, problem):
    doc = {**read_manifest(digits_dataset), **change}
    folder = _write_json(tmp_path / "bad", doc)
    with pytest.raises(DatasetError, match=re.escape(problem)) as err:
        read_manifest(folder)
    assert str(folder / "manifest.json") in str(err.value) and "aigc data build" in str(err.value)


def test_read_manifest_checks_shard_and_split_counts(digits_dataset, tmp_path):
    doc = read_manifest(digits_dataset)
    doc["splits"]["val"]["shards"][0]["num_samples"] = "100"
    with pytest.raises(DatasetError, match="val-000000.tar: num_samples"):
        read_manifest(_write_json(tmp_path / "a", doc))
    doc = read_manifest(digits_dataset)
    del doc["splits"]["train"]["num_samples"]
    with pytest.raises(DatasetError, match=r"splits\.train\.num_samples is None, not its shards' total 1617"):
        read_manifest(_write_json(tmp_path / "b", doc))
    doc = read_manifest(digits_dataset)
    doc["splits"]["val"]["shards"][1]["name"] = "../val-000001.tar"
    with pytest.raises(DatasetError, match="not a plain file name"):
        read_manifest(_write_json(tmp_path / "c", doc))


def test_read_manifest_takes_the_manifest_file_and_reports_a_missing_one(digits_dataset, tmp_path):
    assert read_manifest(digits_dataset / "manifest.json") == read_manifest(digits_dataset)
    assert version(digits_dataset / "manifest.json") == read_manifest(digits_dataset)["digest"]
    with pytest.raises(DatasetNotFound, match=re.escape(str(tmp_path / "nowhere" / "manifest.json"))) as err:
        read_manifest(tmp_path / "nowhere")
    assert isinstance(err.value, FileNotFoundError) and "`aigc data build`" in str(err.value)


def test_read_manifest_reads_fsspec_urls_and_names_a_missing_one(digits_dataset, tmp_path):
    # fsspec's in-memory filesystem stands in for s3:// or gs:// (same code path, no network).
    import fsspec

    mem = fsspec.filesystem("memory")
    root = f"/aigc-manifest-test-{tmp_path.name}"
    url = f"memory://{root}/digits"
    mem.pipe(f"{root}/digits/manifest.json", (digits_dataset / "manifest.json").read_bytes())
    mem.pipe(f"{root}/broken/manifest.json", b"{not json")
    try:
        expected = read_manifest(digits_dataset)
        assert (
            read_manifest(url)
            == read_manifest(url + "/")
            == read_manifest(f"{url}/manifest.json")
            == expected
        )
        assert version(url) == expected["digest"]  # DVC cannot be read through a URL: the digest
        assert shard_location(f"{url}/manifest.json", "val-000000.tar") == f"{url}/val-000000.tar"
        missing = f"memory://{root}/nowhere"
        with pytest.raises(DatasetNotFound, match=re.escape(f"{missing}/manifest.json")) as err:
            read_manifest(missing)
        assert isinstance(err.value, FileNotFoundError) and "`aigc data build`" in str(err.value)
        with pytest.raises(
            DatasetError, match=re.escape(f"memory://{root}/broken/manifest.json: not valid JSON")
        ):
            read_manifest(f"memory://{root}/broken")
    finally:
        mem.rm(root, recursive=True)


# ------------------------------------------------------------------------------------------ verify


@pytest.fixture
def dataset_copy(digits_dataset, tmp_path) -> Path:
    return Path(shutil.copytree(digits_dataset, tmp_path / "digits"))


def test_verify_passes_on_a_good_dataset(dataset_copy):
    report = verify_dataset(dataset_copy)
    assert report.ok and report.checked == 19 and report.problems() == []


def test_verify_detects_one_flipped_byte(dataset_copy):
    shard = dataset_copy / "train-000007.tar"
    data = bytearray(shard.read_bytes())
    data[1000] ^= 0x01
    shard.write_bytes(bytes(data))
    report = verify_dataset(dataset_copy)
    assert not report.ok
    assert report.mismatched == ["train-000007.tar"] and not report.missing and not report.extra
    assert any("train-000007.tar" in line for line in report.problems())


def test_verify_detects_missing_and_extra_shards(dataset_copy):
    (dataset_copy / "val-000001.tar").unlink()
    shutil.copy(dataset_copy / "train-000000.tar", dataset_copy / "train-000099.tar")
    report = verify_dataset(dataset_copy)
    assert not report.ok
    assert report.missing == ["val-000001.tar"]
    assert report.extra == ["train-000099.tar"]
    assert report.mismatched == []


def test_verify_cli_names_bad_shards(dataset_copy):
    runner = CliRunner()
    ok = runner.invoke(app, ["data", "verify", str(dataset_copy)])
    assert ok.exit_code == 0, ok.output
    (dataset_copy / "train-000003.tar").unlink()
    bad = runner.invoke(app, ["data", "verify", str(dataset_copy)])
    assert bad.exit_code == 1
    assert "train-000003.tar" in bad.output


# ---------------------------------------------------------------------------------- config errors


def test_bad_key_is_named_with_exit_code_2(tmp_path):
    result = CliRunner().invoke(
        app, ["data", "build", "--out", str(tmp_path / "x"), "--set", "data.imagesize=16"]
    )
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "data.imagesize" in lines[0] and "unknown key" in lines[0]
    assert "Traceback" not in result.output
    assert not (tmp_path / "x").exists()


def test_bad_value_and_params_file_keys_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.image_size"):
        load_data_config(None, ["image_size=3"])
    params = tmp_path / "params.yaml"
    params.write_text("data:\n  samples_per_shard: 10\n  shard_size: 5\n")
    with pytest.raises(ConfigError, match=r"data\.shard_size"):
        load_data_config(params, [])
    params.write_text("data:\n  samples_per_shard: 10\n")
    cfg = load_data_config(params, ["data.image_size=16"], name="other")
    assert (cfg.samples_per_shard, cfg.image_size, cfg.name) == (10, 16, "other")

"""The streaming loader on real tar shards, in one process (DataLoader workers included)."""

from __future__ import annotations

import io
import logging
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from loader_shards import all_keys, truncate, write_dataset

from aigc.config import DataConfig, TrainerConfig
from aigc.data.loader import BadDataError, ShardDataModule
from aigc.data.loader_read import TarFormatError, iter_tar_files, iter_tar_samples
from aigc.data.location import resolve_location
from aigc.data.manifest import DatasetError, read_manifest
from aigc.data.version import version
from aigc.training.trainer import build_trainer


def _cfg(**kw) -> DataConfig:
    base = {"batch_size": 64, "num_workers": 0, "shuffle_buffer": 200, "max_bad_fraction": 0.0}
    return DataConfig(**{**base, **kw})


def _epoch(loader) -> tuple[list[dict], list[str]]:
    """All batches of one pass and the keys of the real (valid) samples, in order."""
    batches = list(loader)
    keys = [k for b in batches for k, v in zip(b["key"], b["valid"].tolist(), strict=True) if v]
    return batches, keys


def _digit_keys(folder: Path, split: str) -> list[str]:
    manifest = read_manifest(folder)
    shards = manifest["splits"][split]["shards"]
    return [key for s in shards for key, _ in iter_tar_samples(folder / s["name"])]


@pytest.mark.timeout(60)
def test_train_epoch_covers_split_once_with_contract_batches(digits_dataset: Path) -> None:
    dm = ShardDataModule(_cfg(), digits_dataset)
    expected = _digit_keys(digits_dataset, "train")
    n = dm.batches_per_epoch("train")
    assert n == -(-len(expected) // 64)
    batches, keys = _epoch(dm.train_dataloader())
    assert len(batches) == n == len(dm.train_dataloader())
    assert sorted(keys) == sorted(expected)  # every sample once; padding is marked invalid
    padded = sum(int((~b["valid"]).sum()) for b in batches)
    assert padded == n * 64 - len(expected)
    for b in batches:
        assert set(b) == {"image", "caption", "label", "key", "valid", "index"}
        assert b["index"].shape == (64,) and b["index"].dtype == torch.long
        assert b["image"].shape == (64, 1, 8, 8) and b["image"].dtype == torch.float32
        assert b["label"].shape == (64,) and b["label"].dtype == torch.long
        assert b["valid"].dtype == torch.bool
        assert len(b["caption"]) == len(b["key"]) == 64
        assert all(isinstance(c, str) and c for c in b["caption"])
    images = torch.cat([b["image"] for b in batches])
    assert images.min() == -1.0 and images.max() == 1.0  # uint8 0..255 -> exactly [-1, 1]
    labels = torch.cat([b["label"] for b in batches])
    assert set(labels.tolist()) == set(range(10))
    assert dm.data_version == read_manifest(digits_dataset)["digest"]


def _global_index(key: str, sizes: list[int]) -> int:
    """``<split>-<shard>-<i>`` (loader_shards' keys) -> the sample's index in its split."""
    _, shard, i = key.split("-")
    return sum(sizes[: int(shard)]) + int(i)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("before", "after"), [(2, 3), (3, 2), (2, 1)])
def test_resume_at_another_world_size_trains_the_rest_of_the_epoch_once(
    tmp_path: Path, monkeypatch, before: int, after: int
) -> None:
    """Elastic training: an epoch trained ``done`` batches on ``before`` ranks (shuffle buffer, two
    DataLoader workers, uneven shards); resumed on ``after`` ranks with the samples it saw, the new
    ranks share out exactly the rest, in equal batch counts, and the loader's length holds them."""
    sizes = [37, 11, 23, 5, 29]
    write_dataset(tmp_path / "d", {"train": sizes, "val": [4]})
    cfg = _cfg(batch_size=4, num_workers=2, shuffle_buffer=16)
    epoch, done = 1, 3

    def rank_loaders(world: int, seen=None):
        for rank in range(world):
            monkeypatch.setenv("RANK", str(rank))
            monkeypatch.setenv("WORLD_SIZE", str(world))
            dm = ShardDataModule(cfg, tmp_path / "d", seed=5)
            dm.set_epoch(epoch)
            if seen is not None:
                dm.resume_at(epoch, done, seen)
            yield dm.train_dataloader()

    seen = np.zeros(sum(sizes), dtype=bool)
    for loader in rank_loaders(before):
        for batch in list(loader)[:done]:
            for key, at, valid in zip(
                batch["key"], batch["index"].tolist(), batch["valid"].tolist(), strict=True
            ):
                assert at == _global_index(key, sizes)  # the index names the sample
                seen[at] |= valid
    assert seen.sum() == before * done * 4  # no padding that early

    rest: list[int] = []
    counts = set()
    for loader in rank_loaders(after, seen):
        batches = list(loader)
        counts.add(len(batches))
        # Lightning counts the resumed epoch's batches from `done`: the length must hold them all.
        assert len(loader) >= done + len(batches)
        rest += [
            at for b in batches for at, v in zip(b["index"].tolist(), b["valid"].tolist(), strict=True) if v
        ]
    assert len(counts) == 1, f"ranks yield different batch counts: {counts}"
    assert counts == {-(-(len(seen) - seen.sum()) // (after * 4))}
    assert len(rest) == len(set(rest)), "a sample trained twice after the resize"
    assert sorted(rest) == sorted(np.flatnonzero(~seen).tolist()), "the rest of the epoch is not covered"


@pytest.mark.timeout(60)
def test_val_covers_each_sample_once_in_manifest_order(digits_dataset: Path) -> None:
    dm = ShardDataModule(_cfg(), digits_dataset)
    expected = _digit_keys(digits_dataset, "val")
    batches, keys = _epoch(dm.val_dataloader())
    assert len(batches) == dm.batches_per_epoch("val") == -(-len(expected) // 64)
    assert keys == expected  # not shuffled
    assert not batches[-1]["valid"].all()  # 180 samples do not fill 3 batches: padding marked


@pytest.mark.timeout(60)
def test_shuffle_is_seeded_reproducible_and_differs_across_epochs(digits_dataset: Path) -> None:
    cfg = _cfg()
    a, b, c = (ShardDataModule(cfg, digits_dataset, seed=s) for s in (7, 7, 8))
    epoch0 = _epoch(a.train_dataloader())[1]
    assert _epoch(b.train_dataloader())[1] == epoch0
    assert _epoch(c.train_dataloader())[1] != epoch0
    a.set_epoch(1)
    epoch1 = _epoch(a.train_dataloader())[1]
    assert epoch1 != epoch0 and sorted(epoch1) == sorted(epoch0)
    b.set_epoch(1)
    assert _epoch(b.train_dataloader())[1] == epoch1
    # The shuffle buffer mixes samples across shards: the first batch holds several shards' keys.
    first = _epoch(a.train_dataloader())[0][0]["key"]
    assert first != sorted(first)


@pytest.mark.timeout(60)
def test_two_workers_split_the_rank_share(digits_dataset: Path) -> None:
    dm = ShardDataModule(_cfg(num_workers=2), digits_dataset)
    batches, keys = _epoch(dm.train_dataloader())
    assert len(batches) == dm.batches_per_epoch("train")
    assert sorted(keys) == sorted(_digit_keys(digits_dataset, "train"))
    val_batches, val_keys = _epoch(dm.val_dataloader())
    assert len(val_batches) == dm.batches_per_epoch("val")
    assert sorted(val_keys) == sorted(_digit_keys(digits_dataset, "val"))


@pytest.mark.timeout(60)
def test_loader_workers_persist_across_epochs_and_see_each_epoch(digits_dataset: Path) -> None:
    # One loader iterated epoch after epoch, as Lightning does: its worker processes are forked once
    # and still shuffle by the epoch set in the main process.
    dm = ShardDataModule(_cfg(num_workers=2), digits_dataset, seed=3)
    loader = dm.train_dataloader()
    keys0 = _epoch(loader)[1]
    pids = [w.pid for w in loader._iterator._workers]
    dm.set_epoch(1)
    keys1 = _epoch(loader)[1]
    assert [w.pid for w in loader._iterator._workers] == pids and all(
        w.is_alive() for w in loader._iterator._workers
    )
    fresh = ShardDataModule(_cfg(num_workers=2), digits_dataset, seed=3)
    assert _epoch(fresh.train_dataloader())[1] == keys0
    fresh.set_epoch(1)
    assert _epoch(fresh.train_dataloader())[1] == keys1 != keys0


def _move_tars(folder: Path, split: str, to: Path) -> None:
    to.mkdir(exist_ok=True)
    for tar in folder.glob(f"{split}-*.tar"):
        tar.rename(to / tar.name)


@pytest.mark.timeout(60)
def test_decoded_cache_serves_later_epochs_without_changing_a_batch(tmp_path: Path, caplog) -> None:
    folder = tmp_path / "ds"
    bad = {"train-01-0003": "image", "train-02-0004": "json"}
    write_dataset(folder, {"train": [40, 40, 21], "val": [10]}, bad=bad)
    cfg = {"batch_size": 16, "max_bad_fraction": 0.05}
    plain = ShardDataModule(_cfg(**cfg, decoded_cache_mb=0), folder, seed=5)
    cached = ShardDataModule(_cfg(**cfg), folder, seed=5)
    a, b = plain.train_dataloader(), cached.train_dataloader()
    expected = []
    for epoch in range(3):
        plain.set_epoch(epoch)
        expected.append((_epoch(a)[0], dict(a.dataset.stats.bad)))
    _epoch(b)  # epoch 0 reads the tars and fills the cache
    _move_tars(folder, "train", tmp_path / "away")  # later epochs cannot have read them
    for epoch in (1, 2):
        cached.set_epoch(epoch)
        with caplog.at_level(logging.WARNING, logger="aigc.data.loader"):
            caplog.clear()
            batches = _epoch(b)[0]
        want, want_bad = expected[epoch]
        assert [x["key"] for x in batches] == [x["key"] for x in want]
        assert all(torch.equal(x["image"], y["image"]) for x, y in zip(batches, want, strict=True))
        assert all(torch.equal(x["valid"], y["valid"]) for x, y in zip(batches, want, strict=True))
        # Bad samples are still counted, and named, every epoch.
        assert dict(b.dataset.stats.bad) == want_bad and sum(want_bad.values()) == 2
        assert "train-01-0003" in caplog.text


@pytest.mark.timeout(60)
def test_persistent_workers_keep_their_decoded_cache(tmp_path: Path) -> None:
    folder = tmp_path / "ds"
    write_dataset(folder, {"train": [8], "val": [12, 9, 7]})
    dm = ShardDataModule(_cfg(batch_size=4, num_workers=2), folder)
    loader = dm.val_dataloader()
    first = _epoch(loader)[1]
    _move_tars(folder, "val", tmp_path / "away")
    assert _epoch(loader)[1] == first and sorted(first) == sorted(all_keys(read_manifest(folder), "val"))
    # Without the cache the same second pass has nothing to read.
    _move_tars(tmp_path / "away", "val", folder)
    dm = ShardDataModule(_cfg(batch_size=4, num_workers=2, decoded_cache_mb=0), folder)
    loader = dm.val_dataloader()
    _epoch(loader)
    _move_tars(folder, "val", tmp_path / "away2")
    with pytest.raises(BadDataError):
        _epoch(loader)


@pytest.mark.timeout(60)
def test_file_url_location(digits_dataset: Path) -> None:
    dm = ShardDataModule(_cfg(), digits_dataset.as_uri())
    assert dm.location.startswith("file://")
    _, keys = _epoch(dm.val_dataloader())
    assert sorted(keys) == sorted(_digit_keys(digits_dataset, "val"))


@pytest.mark.timeout(60)
def test_other_fsspec_filesystems(tmp_path: Path) -> None:
    # fsspec's in-memory filesystem stands in for s3:// or gs:// (same code path, no network).
    import fsspec

    manifest = write_dataset(tmp_path / "src", {"train": [6, 5], "val": [3]})
    mem = fsspec.filesystem("memory")
    for f in (tmp_path / "src").iterdir():
        mem.pipe(f"/loader-test/{f.name}", f.read_bytes())
    try:
        dm = ShardDataModule(_cfg(batch_size=4), "memory://loader-test")
        _, keys = _epoch(dm.train_dataloader())
        assert sorted(keys) == sorted(all_keys(manifest, "train"))
        assert dm.data_version == manifest["digest"]
    finally:
        mem.rm("/loader-test", recursive=True)


@pytest.mark.timeout(60)
def test_data_version_of_a_dvc_tracked_folder_is_its_dvc_md5(tmp_path: Path) -> None:
    # A folder added with `dvc add` in a DVC repo: its data version is the md5 DVC recorded, as
    # for every other consumer of aigc.data.version, not the manifest digest.
    repo = tmp_path / "repo"
    (repo / ".dvc").mkdir(parents=True)
    folder = repo / "datasets" / "small"
    manifest = write_dataset(folder, {"train": [6, 5], "val": [3]})
    md5 = "0123456789abcdef0123456789abcdef.dir"
    (folder.parent / "small.dvc").write_text(f"outs:\n- md5: {md5}\n  size: 1\n  path: small\n")
    dm = ShardDataModule(_cfg(batch_size=4), folder)
    assert dm.data_version == version(folder) == md5 != manifest["digest"]
    assert ShardDataModule(_cfg(batch_size=4), folder.as_uri()).data_version == md5


@pytest.mark.timeout(60)
def test_ranks_from_env_vars_are_disjoint_and_cover(digits_dataset: Path, monkeypatch) -> None:
    per_rank = []
    for rank in range(3):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "3")
        dm = ShardDataModule(_cfg(batch_size=32), digits_dataset)
        batches, keys = _epoch(dm.train_dataloader())
        assert len(batches) == dm.batches_per_epoch("train") == -(-1617 // 96)
        per_rank.append(set(keys))
    assert sum(len(k) for k in per_rank) == len(set().union(*per_rank)) == 1617


@pytest.mark.timeout(60)
def test_rgb_and_jpg_decode(tmp_path: Path) -> None:
    write_dataset(tmp_path / "rgb", {"train": [10, 7], "val": [5]}, image_size=16, channels=3, jpg_every=3)
    dm = ShardDataModule(_cfg(batch_size=4, image_size=16, channels=3), tmp_path / "rgb")
    batches, keys = _epoch(dm.train_dataloader())
    assert len(batches) == 5 and len(keys) == 17
    assert batches[0]["image"].shape == (4, 3, 16, 16)
    assert all(float(b["image"].min()) >= -1.0 and float(b["image"].max()) <= 1.0 for b in batches)


def _jpeg(pixels, **save) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90, **save)
    return buf.getvalue()


def test_jpeg_fast_path_gives_pils_pixels_and_leaves_the_rest_to_pil() -> None:
    """JPEGs at the dataset size decode through libjpeg-turbo (simplejpeg) to exactly PIL's pixels;
    conversions, other sizes and broken files stay PIL's, errors included."""
    import numpy as np
    from PIL import Image

    from aigc.data.loader_read import _decode_jpeg, decode_image

    rng = np.random.default_rng(0)
    # Smooth colour ramps plus noise: chroma subsampling and the DCT both have something to do.
    ramp = np.linspace(0, 255, 32)
    rgb = np.stack(np.broadcast_arrays(ramp[:, None], ramp[None, :], 255 - ramp[:, None]), -1)
    rgb = np.clip(rgb + rng.normal(0, 20, rgb.shape), 0, 255).astype(np.uint8)  # (32, 32, 3)
    grey = rgb[..., 1].copy()

    def pil(data: bytes, mode: str) -> np.ndarray:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert(mode))

    fast = {
        "rgb 4:4:4": (_jpeg(rgb, subsampling=0), "RGB"),
        "rgb 4:2:0": (_jpeg(rgb, subsampling=2), "RGB"),
        "grey as L": (_jpeg(grey), "L"),
    }
    for case, (data, mode) in fast.items():
        taken = _decode_jpeg(data, mode, 32)
        assert taken is not None, case
        assert taken.shape == pil(data, mode).shape and np.array_equal(taken, pil(data, mode)), case
        assert np.array_equal(decode_image(data, mode, 32), pil(data, mode)), case
    for case, (data, mode, size) in {
        "grey as RGB": (_jpeg(grey), "RGB", 32),
        "rgb as L (PIL's luma)": (_jpeg(rgb), "L", 32),
        "other size (crop + resize)": (_jpeg(rgb), "RGB", 16),
    }.items():
        assert _decode_jpeg(data, mode, size) is None, case
        assert decode_image(data, mode, size).shape == ((size, size, 3) if mode == "RGB" else (size, size))
    assert np.array_equal(decode_image(_jpeg(grey), "RGB", 32), pil(_jpeg(grey), "RGB"))
    broken = _jpeg(rgb)[:300]  # the header survives, the scan is cut
    assert _decode_jpeg(broken, "RGB", 32) is None
    with pytest.raises(OSError, match="(?i)truncated"):
        decode_image(broken, "RGB", 32)  # PIL's verdict and wording


@pytest.mark.timeout(60)
def test_truncated_shard_is_reported_with_its_path_and_skipped(tmp_path: Path, caplog) -> None:
    folder = tmp_path / "cut"
    manifest = write_dataset(folder, {"train": [30, 30, 30], "val": [5]})
    truncate(folder / "train-000001.tar", 0.5)
    dm = ShardDataModule(_cfg(batch_size=8, max_bad_fraction=0.25), folder)
    loader = dm.train_dataloader()
    with caplog.at_level(logging.WARNING, logger="aigc.data.loader"):
        batches, keys = _epoch(loader)
    assert len(batches) == dm.batches_per_epoch("train") == 12  # the batch count never changes
    assert str(folder / "train-000001.tar") in caplog.text
    lost = all_keys(manifest, "train") - set(keys)
    assert lost and all(k.startswith("train-01-") for k in lost)  # only the cut shard lost samples
    assert len(keys) == len(set(keys))
    stats = loader.dataset.stats
    assert stats.bad == {str(folder / "train-000001.tar"): len(lost)}
    assert stats.good == len(keys) and stats.assigned == 90
    # A piece of a cut tar is never cached: the next epoch reads it again and reports the same loss.
    dm.set_epoch(1)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="aigc.data.loader"):
        assert sorted(_epoch(loader)[1]) == sorted(keys)
    assert str(folder / "train-000001.tar") in caplog.text
    assert loader.dataset.stats.bad == {str(folder / "train-000001.tar"): len(lost)}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_reader_matches_tarfile(fmt: int) -> None:
    names = ["d/" + "k" * 120 + ".png", "short.txt", "big.bin", "caf\u00e9.json", "empty.txt"]
    if fmt == tarfile.USTAR_FORMAT:
        names[0] = "p" * 60 + "/" + "k" * 80 + ".png"  # ustar: long names via the prefix field
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        folder = tarfile.TarInfo("d")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for i, name in enumerate(names):
            info = tarfile.TarInfo(name)
            info.size = [5, 3, 3000, 7, 0][i]
            tar.addfile(info, io.BytesIO(os.urandom(info.size)))
    data = buf.getvalue()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        expected = [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]
    assert list(iter_tar_files(io.BytesIO(data))) == expected
    for cut in (0, 100, 512, 1500, 4000):
        with pytest.raises(TarFormatError, match="unexpected end of data"):
            list(iter_tar_files(io.BytesIO(data[:cut])))
    with pytest.raises(TarFormatError, match="not a tar"):
        list(iter_tar_files(io.BytesIO(b"x" * 2048)))


@pytest.fixture(scope="module")
def corrupt_dataset(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("corrupt") / "ds"
    bad = {"train-01-0003": "image", "train-01-0010": "caption", "train-02-0004": "json"}
    write_dataset(folder, {"train": [40, 40, 20], "val": [10]}, bad=bad)
    return folder


@pytest.mark.timeout(60)
def test_bad_samples_below_threshold_are_skipped_and_counted(corrupt_dataset: Path, caplog) -> None:
    dm = ShardDataModule(_cfg(batch_size=16, max_bad_fraction=0.05), corrupt_dataset)
    loader = dm.train_dataloader()
    with caplog.at_level(logging.WARNING, logger="aigc.data.loader"):
        batches, keys = _epoch(loader)
    assert len(batches) == 7 and len(keys) == 97
    assert not {"train-01-0003", "train-01-0010", "train-02-0004"} & set(keys)
    for key, reason in [
        ("train-01-0003", "undecodable image"),
        ("train-01-0010", "missing caption"),
        ("train-02-0004", "bad json"),
    ]:
        assert key in caplog.text and reason in caplog.text
    assert str(corrupt_dataset / "train-000001.tar") in caplog.text
    assert loader.dataset.stats.num_bad == 3
    assert dict(loader.dataset.stats.bad) == {
        str(corrupt_dataset / "train-000001.tar"): 2,
        str(corrupt_dataset / "train-000002.tar"): 1,
    }


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers", [0, 2])
def test_bad_samples_above_threshold_raise_naming_the_shard(corrupt_dataset: Path, workers: int) -> None:
    dm = ShardDataModule(_cfg(batch_size=16, max_bad_fraction=0.02, num_workers=workers), corrupt_dataset)
    with pytest.raises(BadDataError) as err:
        _epoch(dm.train_dataloader())
    msg = str(err.value)
    assert str(corrupt_dataset / "train-000001.tar") in msg
    assert "max_bad_fraction 0.02" in msg


@pytest.mark.timeout(30)
@pytest.mark.parametrize("location", ["pipe:cat /etc/passwd", " PIPE:curl http://x | tar x"])
def test_pipe_locations_are_rejected(location: str) -> None:
    with pytest.raises(ValueError, match="pipe:"):
        ShardDataModule(_cfg(), location)
    with pytest.raises(ValueError, match="pipe:"):
        ShardDataModule(_cfg(location=location))


def test_locations_resolve_against_the_project_root(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("AIGC_PROJECT_ROOT", str(tmp_path))
    assert resolve_location(_cfg(name="digits")) == str(tmp_path / "datasets" / "digits")
    assert resolve_location(_cfg(location="data/ds")) == str(tmp_path / "data" / "ds")
    assert resolve_location(_cfg(location="data/ds"), "/abs/ds") == "/abs/ds"
    assert resolve_location(_cfg(), "s3://bucket/ds") == "s3://bucket/ds"


@pytest.mark.timeout(30)
def test_missing_dataset_and_config_mismatch_are_clear_errors(tmp_path: Path, digits_dataset: Path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")) as err:
        ShardDataModule(_cfg(), tmp_path / "nowhere").train_dataloader()
    assert isinstance(err.value, DatasetError) and "aigc data build" in str(err.value)
    with pytest.raises(ValueError, match="channels 3"):
        ShardDataModule(_cfg(channels=3), digits_dataset).train_dataloader()


@pytest.mark.timeout(120)
def test_lightning_fit_uses_trainer_epoch(tmp_path: Path) -> None:
    import pytorch_lightning as pl

    folder = tmp_path / "small"
    write_dataset(folder, {"train": [13, 9, 11], "val": [6, 3]})

    class Recorder(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.keys: dict[int, list[str]] = {}
            self.val_keys: list[str] = []

        def training_step(self, batch, _):
            self.keys.setdefault(self.current_epoch, []).extend(
                k for k, v in zip(batch["key"], batch["valid"].tolist(), strict=True) if v
            )
            return (self.w * batch["image"].mean()).sum()

        def validation_step(self, batch, _):
            self.val_keys.extend(k for k, v in zip(batch["key"], batch["valid"].tolist(), strict=True) if v)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    model, dm = Recorder(), ShardDataModule(_cfg(batch_size=4, shuffle_buffer=8), folder)
    # Two epochs of 9 batches, validating (every val batch) at the end of each: aigc train's Trainer.
    tc = TrainerConfig(max_steps=18, val_every_steps=9, limit_val_batches=1000, grad_clip=None)
    trainer = build_trainer(model, tc, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    assert trainer.num_training_batches == dm.batches_per_epoch("train") == 9
    assert sorted(model.keys[0]) == sorted(model.keys[1]) == sorted(all_keys(read_manifest(folder), "train"))
    assert model.keys[0] != model.keys[1]  # the trainer's epoch reached the shuffle
    val_keys = list(all_keys(read_manifest(folder), "val"))
    assert sorted(model.val_keys) == sorted(2 * val_keys)  # each val sample once per epoch

"""Unit tests of aigc.evaluation: the metric maths, the split reader, evaluator save/load/cache.

The evaluator here is trained for a handful of steps on a tiny hand-written shard folder: these
tests check plumbing and numerics, not quality (tests/integration/test_evaluator.py does that on
the real digits shards).
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from aigc.data.manifest import FORMAT, compute_digest
from aigc.data.version import version as data_version
from aigc.evaluation import (
    EvaluatorConfig,
    ReferenceEvaluator,
    comparable,
    evaluate_images,
    reference_evaluator,
)
from aigc.evaluation.data import read_split
from aigc.evaluation.metrics import (
    frechet_distance,
    group_diversity,
    mean_pairwise_distance,
    nearest_distances,
)
from aigc.evaluation.nets import clip_loss
from aigc.evaluation.reference import files_hash
from aigc.evaluation.training import random_shift

TINY = EvaluatorConfig(
    width=8,
    feature_dim=8,
    embed_dim=8,
    text_dim=16,
    text_layers=1,
    clip_steps=3,
    classifier_steps=3,
    batch_size=16,
)


# ------------------------------------------------------------------------------------ tiny data
def _pattern(label: int, i: int) -> np.ndarray:
    """8x8 uint8: class 0 lights the left half, class 1 the right half, with per-sample noise."""
    rng = np.random.default_rng(1000 * label + i)
    img = rng.integers(0, 40, (8, 8)).astype(np.uint8)
    img[:, :4] += 200 if label == 0 else 0
    img[:, 4:] += 200 if label == 1 else 0
    return img


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_tiny_dataset(folder: Path, n_train: int = 32, n_val: int = 12, labels: bool = True) -> Path:
    """A real shard folder (tars + manifest in the aigc-shards/1 format) of two pattern classes."""
    folder.mkdir(parents=True)
    splits = {}
    for split, n in (("train", n_train), ("val", n_val)):
        name = f"{split}-000000.tar"
        with tarfile.open(folder / name, "w") as tar:
            for i in range(n):
                label = i % 2
                key = f"{split}-{i:04d}"
                buf = io.BytesIO()
                Image.fromarray(_pattern(label, i + (0 if split == "train" else 500)), "L").save(buf, "PNG")
                _add(tar, f"{key}.png", buf.getvalue())
                _add(tar, f"{key}.txt", f"a {'left' if label == 0 else 'right'} pattern".encode())
                _add(tar, f"{key}.json", json.dumps({"label": label} if labels else {"source": "x"}).encode())
                if i == 0:
                    _add(tar, f"{key}.pyd", b"\x80\x04 not to be unpickled")
        data = (folder / name).read_bytes()
        splits[split] = {
            "num_samples": n,
            "shards": [
                {
                    "name": name,
                    "num_samples": n,
                    "bytes": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(),
                }
            ],
        }
    manifest = {
        "format": FORMAT,
        "name": "tiny",
        "source": {"type": "folder"},
        "image_size": 8,
        "channels": 1,
        "splits": splits,
        "skipped": {},
        "digest": compute_digest(splits),
    }
    (folder / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_dataset(tmp_path_factory.mktemp("eval") / "tiny")


@pytest.fixture(scope="module")
def tiny_evaluator(tiny, tmp_path_factory) -> ReferenceEvaluator:
    return reference_evaluator(tiny, cache_dir=tmp_path_factory.mktemp("cache"), config=TINY)


# ------------------------------------------------------------------------------------- metrics
def test_fd_of_shifted_set_is_squared_shift():
    x = torch.randn(400, 6, generator=torch.Generator().manual_seed(0))
    shift = torch.tensor([1.0, -2.0, 0.5, 0.0, 0.0, 3.0])
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(x, x + shift) == pytest.approx(float((shift**2).sum()), rel=1e-6)


def test_fd_matches_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    n, d = 200_000, 3
    a_var, b_var = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    a = rng.normal(size=(n, d)) * np.sqrt(a_var)
    b = rng.normal(size=(n, d)) * np.sqrt(b_var) + 1.0
    expected = d * 1.0 + ((np.sqrt(a_var) - np.sqrt(b_var)) ** 2).sum()  # |mu|^2 + sum (sa - sb)^2
    assert frechet_distance(a, b) == pytest.approx(expected, rel=0.02)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9)


def test_fd_agrees_with_scipy_sqrtm_and_survives_fewer_samples_than_dims():
    from scipy import linalg

    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(300, 5, generator=g), torch.randn(300, 5, generator=g) * 1.5 + 0.3
    xs, ys = x.double().numpy(), y.double().numpy()
    s1, s2 = np.cov(xs, rowvar=False), np.cov(ys, rowvar=False)
    ref = ((xs.mean(0) - ys.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(x, y) == pytest.approx(ref, rel=1e-6)
    few = frechet_distance(torch.randn(10, 64, generator=g), torch.randn(10, 64, generator=g))
    assert np.isfinite(few) and few > 0  # rank-deficient covariances: no NaN, no complex part
    with pytest.raises(ValueError, match="N >= 2"):
        frechet_distance(torch.randn(1, 4), torch.randn(5, 4))


def test_pairwise_and_group_diversity():
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0], [6.0, 8.0]])
    assert mean_pairwise_distance(x[:2]) == pytest.approx(5.0)
    assert mean_pairwise_distance(x[:1]) == 0.0
    # groups {0, 2} (identical) and {1, 3} (distance 5): mean of 0 and 5
    assert group_diversity(x, [0, 1, 0, 1]) == pytest.approx(2.5)
    assert group_diversity(x, None) == pytest.approx(mean_pairwise_distance(x))
    with pytest.raises(ValueError, match="two samples"):
        group_diversity(x, [0, 1, 2, 3])


def test_nearest_distances_chunked_equals_brute_force():
    g = torch.Generator().manual_seed(2)
    x, ref = torch.randn(17, 5, generator=g), torch.randn(50, 5, generator=g)
    brute = torch.cdist(x, ref).min(1).values
    assert torch.allclose(nearest_distances(x, ref, chunk=7), brute, atol=1e-5)
    loo = nearest_distances(ref, ref, chunk=7, exclude_self=True)
    d = torch.cdist(ref, ref)
    d.fill_diagonal_(float("inf"))
    assert torch.allclose(loo, d.min(1).values, atol=1e-5)
    assert nearest_distances(ref[:5], ref).max() < 1e-3  # copies are at distance 0


def test_clip_loss_prefers_aligned_pairs_and_duplicates_share_targets():
    e = torch.nn.functional.normalize(torch.randn(4, 8, generator=torch.Generator().manual_seed(3)), dim=-1)
    scale = torch.tensor(2.0)
    caps = ["a", "b", "c", "d"]
    assert clip_loss(e, e, scale, caps) < clip_loss(e, e.roll(1, 0), scale, caps)
    # Two identical captions with identical text embeddings: swapping their images costs nothing.
    caps2 = ["a", "a", "c", "d"]
    swapped = e.clone()
    swapped[[0, 1]] = e[[1, 0]]
    txt = e.clone()
    txt[1] = txt[0]
    assert clip_loss(e, txt, scale, caps2) == pytest.approx(float(clip_loss(swapped, txt, scale, caps2)))


def test_random_shift_translates_without_changing_shape():
    x = torch.zeros(3, 1, 8, 8)
    x[:, :, 4, 4] = 1.0
    out = random_shift(x, 1, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and torch.equal(out.sum((1, 2, 3)), x.sum((1, 2, 3)))
    assert torch.equal(random_shift(x, 0, torch.Generator()), x)


def test_comparable_needs_every_provenance_field_equal():
    a = {"evaluator_hash": "h", "data_version": "v", "num_samples": 500, "seed": 0, "eval/fd": 1.0}
    assert comparable(a, dict(a, **{"eval/fd": 2.0}))
    for key, other in (("evaluator_hash", "h2"), ("data_version", "w"), ("num_samples", 100), ("seed", 1)):
        assert not comparable(a, dict(a, **{key: other}))
    assert not comparable({}, {})


# --------------------------------------------------------------------------------- data reader
def test_read_split_decodes_images_captions_labels_and_skips_other_members(tiny):
    train = read_split(tiny, "train")
    assert train.images.shape == (32, 1, 8, 8) and train.images.dtype == torch.uint8
    assert train.labels.tolist() == [i % 2 for i in range(32)]
    assert train.captions[1] == "a right pattern" and train.keys[0] == "train-0000"
    assert torch.equal(train.images[3, 0], torch.from_numpy(_pattern(1, 3)))
    assert len(read_split(tiny, "train", max_images=5)) == 5


def test_read_split_errors_name_the_path(tmp_path, tiny):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        read_split(tmp_path, "train")
    with pytest.raises(KeyError, match="no split 'test'"):
        read_split(tiny, "test")


def test_unlabelled_data_has_no_labels_and_data_version_is_the_digest(tmp_path):
    folder = write_tiny_dataset(tmp_path / "nolabels", labels=False)
    assert read_split(folder, "val").labels is None
    manifest = json.loads((folder / "manifest.json").read_text())
    assert data_version(folder) == manifest["digest"]


# ------------------------------------------------------------------------- evaluator and cache
def test_evaluator_is_cached_by_data_version_and_hash_covers_its_files(tiny, tiny_evaluator, tmp_path):
    ev = tiny_evaluator
    assert ev.path.name.startswith(data_version(tiny) + "-")  # non-default config: own folder
    assert {p.name for p in ev.path.iterdir()} == {"weights.safetensors", "config.json", "tokenizer.json"}
    # The hash covers every file, but not the training time config.json records: the same weights
    # trained again (another train_seconds) are the same evaluator.
    copy = tmp_path / "copy"
    shutil.copytree(ev.path, copy)
    doc = json.loads((copy / "config.json").read_text())
    doc["train_seconds"] += 12.5
    (copy / "config.json").write_text(json.dumps(doc))
    assert files_hash(copy) == ev.hash
    changes = (("config.json", "torch_threads"), ("weights.safetensors", None), ("tokenizer.json", None))
    for name, change in changes:
        changed = tmp_path / f"changed-{name}"
        shutil.copytree(ev.path, changed)
        if change:
            doc = json.loads((changed / name).read_text())
            doc[change] += 1
            (changed / name).write_text(json.dumps(doc))
        else:
            data = bytearray((changed / name).read_bytes())
            data[-2] ^= 1
            (changed / name).write_bytes(bytes(data))
        assert files_hash(changed) != ev.hash, name
    again = reference_evaluator(tiny, cache_dir=ev.path.parent, config=TINY)  # loads, no training
    assert again.hash == ev.hash and again.info["train_seconds"] == ev.info["train_seconds"]
    images = read_split(tiny, "val").images
    assert torch.equal(again.features(images), ev.features(images))
    assert again.config.num_classes == 2 and again.classify(images).shape == (12,)


def test_evaluator_of_another_format_is_retrained(tiny, tmp_path):
    ev = reference_evaluator(tiny, cache_dir=tmp_path, config=TINY)
    doc = json.loads((ev.path / "config.json").read_text())
    doc["format"] = "aigc-evaluator/0"
    (ev.path / "config.json").write_text(json.dumps(doc))
    messages: list[str] = []
    fresh = reference_evaluator(tiny, cache_dir=tmp_path, config=TINY, progress=messages.append)
    assert any("ignoring" in m for m in messages) and any("training" in m for m in messages)
    assert json.loads((fresh.path / "config.json").read_text())["format"] == "aigc-evaluator/1"


def test_evaluate_images_reports_figures_with_provenance(tiny, tiny_evaluator):
    val = read_split(tiny, "val")
    prompts = val.captions
    result = evaluate_images(val.images, prompts, val.labels, tiny_evaluator, seed=3)
    for key in (
        "eval/fd",
        "eval/fd_train_val",
        "eval/clip_score",
        "eval/cond_accuracy",
        "eval/diversity",
        "eval/copy_fraction",
    ):
        assert isinstance(result[key], float) and np.isfinite(result[key]), key
    assert result["eval/fd"] == pytest.approx(0.0, abs=1e-6)  # val against itself
    assert result["eval/diversity"] == pytest.approx(1.0)
    assert (result["evaluator_hash"], result["data_version"], result["num_samples"], result["seed"]) == (
        tiny_evaluator.hash,
        data_version(tiny),
        12,
        3,
    )
    assert result["collapse"] is False and result["copying"] is False
    same = tiny_evaluator.features(val.images[:1]).repeat(12, 1)
    assert same.std(0).max() == 0  # sanity for the next line: one image repeated has one feature
    collapsed = evaluate_images(val.images[:1].repeat(12, 1, 1, 1), prompts, val.labels, tiny_evaluator)
    assert collapsed["collapse"] is True and collapsed["eval/diversity"] == 0.0


def test_evaluate_images_rejects_bad_input(tiny_evaluator):
    good = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"\(N, 1, 8, 8\)"):
        evaluate_images(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), ["a"] * 4, None, tiny_evaluator)
    with pytest.raises(ValueError, match="uint8"):
        evaluate_images(good.float(), ["a"] * 4, None, tiny_evaluator)
    with pytest.raises(ValueError, match="4 images but 3 prompts"):
        evaluate_images(good, ["a"] * 3, None, tiny_evaluator)
    with pytest.raises(ValueError, match="labels"):
        evaluate_images(good, ["a"] * 4, [0, 1], tiny_evaluator)


def test_evaluator_refuses_another_dataset(tiny_evaluator, tmp_path):
    other = write_tiny_dataset(tmp_path / "other", n_train=10, n_val=4)
    val = read_split(other, "val")
    with pytest.raises(ValueError, match="data version"):
        evaluate_images(val.images, val.captions, val.labels, tiny_evaluator, dataset_dir=other)


@pytest.mark.parametrize(("size", "channels"), [(8, 1), (28, 3), (64, 3)])
def test_networks_take_any_size_and_channel_count(size, channels):
    from aigc.evaluation.nets import DualEncoder, ImageClassifier

    cfg = EvaluatorConfig(image_size=size, channels=channels, num_classes=5, width=8, text_layers=1)
    x = torch.rand(2, channels, size, size) * 2 - 1
    dual = DualEncoder(cfg, vocab_size=20)
    feats = dual.image_features(x)
    assert feats.shape == (2, cfg.feature_dim)
    assert torch.allclose(dual.image_embeddings(feats).norm(dim=-1), torch.ones(2), atol=1e-5)
    assert ImageClassifier(cfg)(x).shape == (2, 5)


def test_training_uses_its_own_thread_count_and_restores_the_callers(tiny, monkeypatch):
    from aigc.evaluation import train_evaluator

    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        # The caller's thread count (aigc train passes the cores its job was given) ...
        monkeypatch.delenv("AIGC_EVALUATOR_THREADS", raising=False)
        assert train_evaluator(tiny, TINY, threads=3).info["torch_threads"] == 3
        assert torch.get_num_threads() == 2
        # ... unless the operator's variable says otherwise.
        monkeypatch.setenv("AIGC_EVALUATOR_THREADS", "1")
        ev = train_evaluator(tiny, TINY, threads=3)
        assert ev.info["torch_threads"] == 1 and torch.get_num_threads() == 2
        assert ev.path is None and ev.hash is None  # not saved
        monkeypatch.setenv("AIGC_EVALUATOR_THREADS", "many")
        with pytest.raises(ValueError, match="AIGC_EVALUATOR_THREADS"):
            train_evaluator(tiny, TINY)
    finally:
        torch.set_num_threads(previous)


def test_default_cache_follows_the_environment(monkeypatch, tmp_path):
    from aigc.evaluation.reference import default_cache_dir

    monkeypatch.setenv("AIGC_EVALUATOR_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("AIGC_EVALUATOR_CACHE")
    assert default_cache_dir().parts[-2:] == (".cache", "evaluators")

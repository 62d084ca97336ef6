"""Latent datasets and latent models: ``aigc data encode`` and training on its output.

Two small autoencoders (KL and VQ) are trained here in-process on the digits shards, exported, and
used to encode the digits into latent shards with the real CLI. A latent diffusion model (KL) and
a latent autoregressive model (VQ) then train through ``aigc train`` on a real local Ray, register,
and generate pixels, decoding with the autoencoder they carry.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_train import tiny_overrides

from tiny import TINY, save_run_checkpoint

ROOT = Path(__file__).resolve().parents[2]
AIGC = str(Path(sys.executable).parent / "aigc")

pytestmark = pytest.mark.slow

AE_TINY = {
    "kl": ["model.kind=kl", "model.base_channels=16", "model.channel_mults=[1,2]", "model.latent_channels=4"],
    "vq": [
        "model.kind=vq",
        "model.base_channels=16",
        "model.channel_mults=[1,2]",
        "model.latent_channels=8",
        "model.codebook_size=32",
    ],
}


def _train_autoencoder(kind: str, dataset: Path, out: Path, steps: int = 60) -> Path:
    """A small autoencoder trained in this process on the digits shards, exported to ``out``."""
    import pytorch_lightning as pl

    from aigc.config import load_config
    from aigc.data.captions_io import read_captions
    from aigc.data.loader import ShardDataModule
    from aigc.models import build_module
    from aigc.models.export import export_model
    from aigc.models.text import Tokenizer
    from aigc.training.trainer import build_trainer

    cfg = load_config(
        None,
        [
            "model.family=autoencoder",
            *AE_TINY[kind],
            f"trainer.max_steps={steps}",
            "trainer.lr=2e-3",
            "trainer.warmup_steps=0",
            "data.num_workers=0",
            "data.batch_size=64",
        ],
    )
    pl.seed_everything(0, verbose=False)
    module = build_module(cfg, Tokenizer.build(read_captions(dataset, "train")), 8, 1)
    torch.set_num_threads(1)
    trainer = build_trainer(module, limit_val_batches=0)
    trainer.fit(module, datamodule=ShardDataModule(cfg.data, location=dataset))
    # Also the layout of an `aigc train` run folder (checkpoint-step*/ with its two files, beside the
    # export), which a run's record or id resolves to.
    save_run_checkpoint(trainer, out.parent / f"run-{kind}", steps)
    return export_model(module.eval(), out)


@pytest.fixture(scope="module")
def encoded(digits_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{"kl": latent dataset, "vq": latent dataset, "kl-ae"/"vq-ae": the autoencoder exports,
    "kl-run"/"vq-run": their run folders}, the KL one made with the real ``aigc data encode``."""
    from aigc.workflows.encode import encode_dataset

    tmp = tmp_path_factory.mktemp("latents")
    out: dict[str, Path] = {}
    for kind in ("kl", "vq"):
        export = _train_autoencoder(kind, digits_dataset, tmp / f"ae-{kind}")
        out[f"{kind}-run"] = tmp / f"run-{kind}"
        target = tmp / f"digits-{kind}"
        if kind == "vq":  # the library call the CLI makes (the CLI itself is checked with kl)
            encode_dataset(digits_dataset, str(export), target)
            out[kind], out[f"{kind}-ae"] = target, export
            continue
        done = subprocess.run(
            [AIGC, "data", "encode", str(digits_dataset), "--autoencoder", str(export), "--out", str(target)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr + done.stdout
        assert f"latents: {kind}" in done.stdout, done.stdout
        out[kind], out[f"{kind}-ae"] = target, export
    return out


def _samples(folder: Path, split: str) -> dict[str, dict[str, bytes]]:
    from aigc.data.loader_read import iter_tar_samples
    from aigc.data.manifest import read_manifest

    m = read_manifest(folder)
    return {k: p for s in m["splits"][split]["shards"] for k, p in iter_tar_samples(folder / s["name"])}


@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_encode_keeps_the_split_keys_and_captions_and_records_the_autoencoder(kind, encoded, digits_dataset):
    from aigc.data.latents import decode_npy
    from aigc.data.manifest import read_manifest
    from aigc.models.export import load_dataset_autoencoder, load_export

    folder = encoded[kind]
    m, images = read_manifest(folder), read_manifest(digits_dataset)
    spec = m["latent"]
    assert spec["kind"] == kind
    assert spec["shape"] == ([4, 4, 4] if kind == "kl" else [4, 4])  # 8x8 digits, downsampled 2x
    assert spec["images"]["location"] == str(digits_dataset.resolve())
    assert spec["images"]["digest"] == images["digest"]
    assert spec["autoencoder"]["path"] == str(encoded[f"{kind}-ae"].resolve())
    assert (m["image_size"], m["channels"]) == (8, 1)  # what a latent model generates
    for split in ("train", "val"):
        assert m["splits"][split]["num_samples"] == images["splits"][split]["num_samples"]
        lat, img = _samples(folder, split), _samples(digits_dataset, split)
        assert list(lat) == list(img)  # same keys, same order
        assert all(lat[k]["txt"] == img[k]["txt"] for k in lat)
        assert all(json.loads(lat[k]["json"])["label"] == json.loads(img[k]["json"])["label"] for k in lat)
    # The stored arrays are the autoencoder's latents of the stored images.
    ae = load_export(encoded[f"{kind}-ae"]).autoencoder
    some = list(_samples(digits_dataset, "val").items())[:16]
    x = torch.stack([torch.from_numpy(np.array(Image.open(io.BytesIO(p["png"])))) for _, p in some])
    x = x.unsqueeze(1).float().div(127.5).sub(1)  # (16, 1, 8, 8) in [-1, 1]
    stored = np.stack([decode_npy(_samples(folder, "val")[k]["npy"], spec) for k, _ in some])
    with torch.no_grad():
        expected = ae.latents(x).numpy() if kind == "kl" else ae.tokens(x).numpy()
    np.testing.assert_allclose(stored, expected, rtol=1e-4, atol=1e-4)
    if kind == "kl":  # LDM's scale factor: the train latents times it have unit variance
        train = np.stack([decode_npy(p["npy"], spec) for p in _samples(folder, "train").values()])
        assert float(np.std(train * spec["scale"])) == pytest.approx(1.0, rel=1e-3)
    else:
        assert spec["scale"] is None and spec["codebook_size"] == 32
    # The dataset carries its autoencoder, verified against the manifest.
    carried = load_dataset_autoencoder(folder)
    for key, value in ae.state_dict().items():
        assert torch.equal(carried.autoencoder.state_dict()[key], value), key
    verify = subprocess.run(
        [AIGC, "data", "verify", str(folder)], capture_output=True, text=True, timeout=120
    )
    assert verify.returncode == 0, verify.stderr


def test_a_latent_member_that_needs_pickle_or_has_the_wrong_shape_is_a_bad_sample():
    from aigc.data.latents import encode_npy
    from aigc.data.loader_read import BadSample, decode_sample

    spec = {"kind": "kl", "shape": [4, 2, 2], "dtype": "float32"}
    good = encode_npy(np.zeros((4, 2, 2), np.float32))
    array, caption, _ = decode_sample({"npy": good, "txt": b"a"}, "L", 8, spec)
    assert array.shape == (4, 2, 2) and caption == "a"
    buf = io.BytesIO()
    np.save(buf, np.array([{"x": 1}], dtype=object), allow_pickle=True)  # would unpickle on load
    for bad in (buf.getvalue(), encode_npy(np.zeros((4, 3, 3), np.float32)), encode_npy(np.zeros((4, 2, 2)))):
        with pytest.raises(BadSample, match="undecodable latent"):
            decode_sample({"npy": bad, "txt": b"a"}, "L", 8, spec)


def test_a_changed_carried_autoencoder_is_refused(encoded, tmp_path):
    import shutil

    from aigc.data.manifest import DatasetError
    from aigc.models.export import load_dataset_autoencoder

    copy = tmp_path / "copy"
    shutil.copytree(encoded["kl"], copy)
    weights = copy / "autoencoder" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(DatasetError, match="sha256 .* differs from the manifest"):
        load_dataset_autoencoder(copy)


def test_encode_refuses_a_model_that_is_not_an_autoencoder_and_an_existing_folder(
    encoded, digits_dataset, tmp_path
):
    from aigc.config import load_config
    from aigc.models import build_module
    from aigc.models.export import export_model
    from aigc.models.text import Tokenizer

    cfg = load_config(None, ["model.family=vae", *TINY["vae"]])
    vae = export_model(build_module(cfg, Tokenizer.build(["a b"]), 8, 1), tmp_path / "vae")
    done = subprocess.run(
        [
            AIGC,
            "data",
            "encode",
            str(digits_dataset),
            "--autoencoder",
            str(vae),
            "--out",
            str(tmp_path / "x"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1 and "a vae model, not an autoencoder" in done.stderr, done.stderr
    assert not (tmp_path / "x").exists()
    again = subprocess.run(
        [
            AIGC,
            "data",
            "encode",
            str(digits_dataset),
            "--autoencoder",
            str(encoded["kl-ae"]),
            "--out",
            str(encoded["kl"]),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 1 and "already exists; pass --overwrite" in again.stderr, again.stderr


def test_a_train_record_names_the_autoencoder_run_and_a_json_that_is_not_one_is_refused(encoded, tmp_path):
    """``--autoencoder pipeline/autoencoder/train.json`` (the DVC encode stage): the record's run gives
    its final checkpoint and the lineage names the run and the record. The run here is a real MLflow
    run whose storage is the fixture's run folder (test_pipeline runs the whole path with aigc train)."""
    from mlflow.tracking import MlflowClient

    from aigc.data.manifest import DatasetError
    from aigc.models.export import load_export
    from aigc.workflows.encode import resolve_autoencoder

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(
        client.create_experiment("ae"), tags={"aigc.storage": str(encoded["kl-run"])}, run_name="ae-kl"
    )
    client.set_terminated(run.info.run_id)
    record = tmp_path / "pipeline" / "autoencoder" / "train.json"
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps({"run_id": run.info.run_id, "step": 60, "eval/fd": 1.0}))

    module, lineage = resolve_autoencoder(str(record), tracking_uri=uri)
    assert lineage["run_id"] == run.info.run_id and lineage["record"] == str(record.resolve())
    assert lineage["checkpoint"] == f"{encoded['kl-run']}/checkpoint-step00000060/checkpoint.ckpt"
    ae = load_export(encoded["kl-ae"]).autoencoder  # the same weights as the run's final checkpoint
    for key, value in ae.state_dict().items():
        assert torch.equal(module.autoencoder.state_dict()[key], value), key

    for bad, why in (
        ({"step": 60}, "no run_id"),
        ([run.info.run_id], "no run_id"),
        ("{not json", "not a readable"),
    ):
        record.write_text(bad if isinstance(bad, str) else json.dumps(bad))
        with pytest.raises(DatasetError, match=f"not an `aigc train --metrics-out` record .*{why}"):
            resolve_autoencoder(str(record), tracking_uri=uri)
    with pytest.raises(DatasetError, match="missing.json: no such file"):
        resolve_autoencoder(str(tmp_path / "missing.json"), tracking_uri=uri)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("family,kind", [("autoregressive", "vq")])
def test_a_latent_model_trains_registers_and_generates_pixels(family, kind, encoded, ray_local, tmp_path):
    """aigc train on latent shards: the model learns on latents, is evaluated on the image dataset
    the latents came from, and its registered export generates pixels with the carried autoencoder.

    Latent diffusion on KL latents goes the same way through the DVC pipeline's train@latent-diffusion
    and register@latent-diffusion (tests/integration/test_pipeline.py), which check the same things;
    it is not trained a second time here."""
    from mlflow.tracking import MlflowClient

    from aigc.data.manifest import read_manifest
    from aigc.models.export import load_export
    from aigc.registry.versions import client_for, load_version, resolve_version
    from aigc.workflows.train import train_and_register

    overrides = tiny_overrides(family, tmp_path, encoded[kind], steps=20, workers=1)
    # Evaluated too: on pixels, against the image dataset's reference evaluator (its data version).
    result = train_and_register(None, overrides, name=f"latent-{family}", eval_samples=20)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = MlflowClient(uri).get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["aigc.data.name"] == f"digits-{kind}"
    losses = [m.value for m in MlflowClient(uri).get_metric_history(result.run_id, "train/loss")]
    assert losses and all(np.isfinite(losses))
    images = read_manifest(encoded[kind])["latent"]["images"]
    assert run.data.tags["aigc.eval.data_version"] == images["version"]
    assert "eval/fd" in run.data.metrics
    name = f"aigc-{family}"
    client = client_for(uri)
    assert result.registered == f"{name}/1"
    module = load_version(client, resolve_version(client, f"{name}/1"))
    assert module.latent["kind"] == kind
    ae = load_export(encoded[f"{kind}-ae"]).autoencoder
    for key, value in ae.state_dict().items():  # the carried autoencoder is the dataset's, unchanged
        assert torch.equal(module.autoencoder.state_dict()[key], value), key
    out = module.generate(["a handwritten digit seven"], num_samples=2, seed=0)
    assert out.dtype == torch.uint8 and tuple(out.shape) == (2, 1, 8, 8)
    assert torch.equal(out, module.generate(["a handwritten digit seven"], num_samples=2, seed=0))


def test_a_family_that_cannot_learn_on_latents_is_refused_before_the_run_opens(encoded, tmp_path):
    from aigc.training import train
    from aigc.training.job import TrainError

    with pytest.raises(TrainError, match="holds kl latents .* 'gan' learns on images only"):
        train(None, tiny_overrides("gan", tmp_path, encoded["kl"], workers=1), name="no")
    with pytest.raises(TrainError, match="holds vq latents .* 'diffusion' learns on kl"):
        train(None, tiny_overrides("diffusion", tmp_path, encoded["vq"], workers=1), name="no")
    assert not (tmp_path / "mlflow.db").exists()


def test_latent_shards_hold_no_images(encoded):
    """What makes encoding pay: the tars carry the small arrays, not the pixels."""
    from aigc.data.manifest import read_manifest

    m = read_manifest(encoded["kl"])
    with tarfile.open(encoded["kl"] / m["splits"]["train"]["shards"][0]["name"]) as tar:
        exts = {name.rsplit(".", 1)[-1] for name in tar.getnames()}
    assert exts == {"npy", "txt", "json"}

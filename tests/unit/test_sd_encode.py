"""``aigc data encode DATASET --autoencoder PIPELINE``: an image dataset encoded once by a diffusers
pipeline's own VAE (kind ``sd`` latents: the posterior mean, unscaled), the VAE stored beside the shards.

The pipeline is the tiny random-weight one of tests/sd_pipeline.py; the dataset the digits (8x8 grey,
repeated to RGB for the VAE: 4x4x4 latents).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from aigc.cli import app
from sd_pipeline import build_tiny_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/unit/conftest.py


def test_a_pipeline_folder_encodes_a_dataset_with_its_vae(digits_dataset, tmp_path):
    from diffusers import AutoencoderKL

    from aigc.data.latents import LATENT_EXT, decode_npy, latent_spec
    from aigc.data.loader_read import ReadStats, decode_sample, iter_piece
    from aigc.data.manifest import read_manifest, sha256_file, shard_location

    pipe = build_tiny_pipeline(tmp_path / "pipe")
    out = tmp_path / "digits-sd"
    r = CliRunner().invoke(
        app, ["data", "encode", str(digits_dataset), "--autoencoder", str(pipe), "--out", str(out)]
    )
    assert r.exit_code == 0, r.output
    assert "latents: sd float32 (4, 4, 4)" in r.output

    m = read_manifest(out)
    spec = latent_spec(m)
    assert spec["kind"] == "sd" and spec["shape"] == [4, 4, 4] and spec["scale"] is None
    assert spec["autoencoder"]["pipeline"] == str(pipe.resolve())
    images = read_manifest(digits_dataset)
    assert {s: v["num_samples"] for s, v in m["splits"].items()} == {
        s: v["num_samples"] for s, v in images["splits"].items()
    }
    # The dataset carries the VAE, in diffusers' layout, checked by sha256.
    weights = out / "autoencoder" / "diffusion_pytorch_model.safetensors"
    assert sha256_file(weights) == spec["autoencoder_sha256"]
    vae = AutoencoderKL.from_pretrained(out / "autoencoder").eval()
    assert spec["autoencoder_model"]["latent_channels"] == 4

    # A stored latent is the VAE's posterior mean of the image (grey repeated to RGB).
    first = m["splits"]["train"]["shards"][0]
    key, parts = next(iter_piece(shard_location(out, first["name"]), 0, 1, ReadStats(assigned=1)))
    z = decode_npy(parts[LATENT_EXT], spec)
    src = images["splits"]["train"]["shards"][0]
    image_key, image_parts = next(
        iter_piece(shard_location(digits_dataset, src["name"]), 0, 1, ReadStats(assigned=1))
    )
    assert image_key == key
    image, _, _ = decode_sample(image_parts, "L", 8)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32)).div(127.5).sub(1.0)
    with torch.no_grad():
        expected = vae.encode(x.view(1, 1, 8, 8).expand(-1, 3, -1, -1)).latent_dist.mean[0].numpy()
    np.testing.assert_allclose(z, expected, rtol=1e-5, atol=1e-6)
    assert json.loads(parts["json"])["image_key"] == key


def test_an_sd_model_learns_on_its_pipelines_latents_and_refuses_another_vaes(digits_dataset, tmp_path):
    """The encoded dataset trains the sd family: batches of stored latents are scaled, not encoded
    again, and the model carries no autoencoder of the dataset's (it decodes with its pipeline's
    VAE). Latents that another pipeline's VAE made are refused, by ``aigc train`` before any run."""
    from aigc.config import load_config
    from aigc.data.latents import LATENT_EXT, decode_npy, latent_spec
    from aigc.data.loader_read import ReadStats, iter_piece
    from aigc.data.manifest import read_manifest, shard_location
    from aigc.models import build_module_for_dataset
    from aigc.training.job import TrainError, check_latent_data

    pipe = build_tiny_pipeline(tmp_path / "pipe")
    other = build_tiny_pipeline(tmp_path / "other", seed=1)  # same architecture, other weights
    out = tmp_path / "digits-sd"
    r = CliRunner().invoke(
        app, ["data", "encode", str(digits_dataset), "--autoencoder", str(pipe), "--out", str(out)]
    )
    assert r.exit_code == 0, r.output
    m = read_manifest(out)

    cfg = load_config(None, ["model.family=sd", f"model.pipeline={pipe}", f"data.location={out}"])
    check_latent_data(cfg, str(out), m)  # the same VAE: accepted
    module = build_module_for_dataset(cfg, str(out))
    assert module.latent["kind"] == "sd" and not module.carries_autoencoder
    assert not hasattr(module, "autoencoder")
    assert not any(k.startswith("autoencoder.") for k in module.state_dict())
    first = m["splits"]["train"]["shards"][0]
    rows = list(iter_piece(shard_location(out, first["name"]), 0, 1, ReadStats(assigned=1)))[:4]
    z = torch.stack([torch.from_numpy(decode_npy(p[LATENT_EXT], latent_spec(m))) for _, p in rows])
    sf = module.vae.config.scaling_factor
    assert torch.equal(module.latents({"image": z}), z * sf)

    cfg_other = load_config(None, ["model.family=sd", f"model.pipeline={other}", f"data.location={out}"])
    with pytest.raises(TrainError, match=r"latents of another VAE than model.pipeline=.*re-encode"):
        check_latent_data(cfg_other, str(out), m)
    with pytest.raises(ValueError, match="latents of another VAE"):
        build_module_for_dataset(cfg_other, str(out))
    # The families that cannot learn sd latents are told which one can.
    with pytest.raises(TrainError, match="holds sd latents .* 'diffusion' learns on kl: use sd on them"):
        check_latent_data(load_config(None, ["model.family=diffusion"]), str(out), m)

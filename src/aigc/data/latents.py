"""Latent datasets, the format: an image dataset encoded once by an autoencoder.

The Stable Diffusion workflow (Rombach et al. 2022, *High-Resolution Image Synthesis with Latent
Diffusion Models*): an autoencoder compresses every image once, and the generative model learns
on the compressed latents, which are 8-48x smaller than the pixels. Encoding once, not in every
training step, is what makes that pay: the encoder runs once per image instead of once per epoch.

A latent dataset is an ordinary shard folder (``manifest.json`` with every shard's sha256, the
same train/val split and sample keys as its image dataset, ``aigc data verify`` works on it) whose
samples carry ``<key>.npy`` in place of the image, next to the same ``.txt`` caption and ``.json``:

- a KL autoencoder: the posterior mean, float32 ``(c, h, w)``, unscaled;
- a VQ autoencoder: the code indices, int16 ``(h, w)`` (the tokens of latent autoregression);
- a diffusers pipeline's VAE (kind ``sd``, the ``sd`` family): the posterior mean, float32
  ``(c, h, w)``, unscaled (the family multiplies by the VAE's ``scaling_factor`` itself). Its
  ``autoencoder/`` is that VAE in diffusers' layout (``config.json``,
  ``diffusion_pytorch_model.safetensors``), ``autoencoder_model`` its config, ``scale`` null.

The folder also holds ``autoencoder/``, the export (``weights.safetensors``, ``config.json``,
``tokenizer.json``) of the autoencoder that made the latents, so the dataset alone is enough to
train a latent model and to decode its samples, and DVC versions the two together. The manifest's
``latent`` section records how to read the arrays and where they came from::

    "latent": {"kind": "kl", "shape": [4, 8, 8], "dtype": "float32", "scale": 1.21,
               "codebook_size": null, "autoencoder_sha256": "...",
               "autoencoder_model": {<the autoencoder's resolved model config>},
               "autoencoder": {"ref": "aigc-autoencoder@candidate", "model": "aigc-autoencoder",
                               "version": "3", "run_id": "..."},
               "images": {"name": "emoji32", "location": "/abs/datasets/emoji32",
                          "version": "<data version>", "digest": "<manifest digest>"}}

``scale`` is LDM's scale factor: 1 / the standard deviation of the train latents, so that a
diffusion model sees latents of unit variance (the noise schedule assumes data of about that
scale). ``image_size`` and ``channels`` stay those of the pixel images a latent model generates.

Only ``numpy.load(..., allow_pickle=False)`` reads an ``.npy`` member, and the array's shape and
dtype are checked against the manifest: a latent shard can hold no pickle.

This module is the format only, which the loader and the evaluation read; ``aigc data encode``,
which loads an autoencoder and writes such a dataset, is :mod:`aigc.workflows.encode`, and the
autoencoder a latent dataset carries is loaded by :func:`aigc.models.export.load_dataset_autoencoder`.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np

from aigc.data.manifest import DatasetError, manifest_location, read_manifest, shard_location

__all__ = [
    "AUTOENCODER_DIR",
    "LATENT_DTYPES",
    "CARRIED_KINDS",
    "LATENT_EXT",
    "encode_npy",
    "decode_npy",
    "latent_spec",
    "autoencoder_location",
    "images_location",
    "evaluation_dataset",
]

#: the extension of a latent sample's array member (in place of the image's)
LATENT_EXT = "npy"
#: the folder inside a latent dataset that holds the autoencoder's export
AUTOENCODER_DIR = "autoencoder"
#: the dtype of the stored arrays, per autoencoder kind
LATENT_DTYPES = {"kl": "float32", "vq": "int16", "sd": "float32"}
#: the kinds whose latent model carries the dataset's autoencoder (its ``autoencoder/`` export, in
#: checkpoints and exports too) to decode with; an ``sd`` model decodes with its pipeline's own VAE,
#: which must be the one the dataset was encoded with (:func:`aigc.models.sd.check_dataset_vae`)
CARRIED_KINDS = ("kl", "vq")


def encode_npy(array: np.ndarray) -> bytes:
    """An array as ``.npy`` bytes (numpy's own format; ``allow_pickle=False``)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def decode_npy(data: bytes, spec: dict[str, Any]) -> np.ndarray:
    """``.npy`` bytes -> the array, checked against a manifest's ``latent`` section.

    Raises ``ValueError`` for anything that is not a plain array of the recorded shape and dtype
    (an object array would need pickle, which is refused).
    """
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(f"not a plain .npy array ({err})") from None
    if not isinstance(array, np.ndarray):
        raise ValueError("not a single .npy array")
    shape, dtype = tuple(spec["shape"]), spec["dtype"]
    if array.shape != shape or array.dtype != np.dtype(dtype):
        raise ValueError(f"array {array.dtype} {array.shape}; the manifest says {dtype} {shape}")
    return array


def latent_spec(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """A manifest's ``latent`` section (None for an image dataset), checked enough to read arrays."""
    spec = manifest.get("latent")
    if spec is None:
        return None
    if (
        not isinstance(spec, dict)
        or spec.get("kind") not in LATENT_DTYPES
        or spec.get("dtype") != LATENT_DTYPES[spec["kind"]]
        or not isinstance(spec.get("shape"), list)
        or not all(isinstance(n, int) and n > 0 for n in spec["shape"])
        or not isinstance(spec.get("autoencoder_model"), dict)
        or (spec["kind"] == "kl" and not isinstance(spec.get("scale"), (int, float)))
    ):
        raise DatasetError(f"manifest of {manifest.get('name')!r}: malformed latent section {spec!r}")
    return spec


def autoencoder_location(location: str | os.PathLike[str]) -> str:
    """Where a latent dataset's autoencoder export is (a path or fsspec URL, like the dataset)."""
    return shard_location(location, AUTOENCODER_DIR)


def images_location(manifest: dict[str, Any]) -> str | None:
    """The image dataset a latent dataset was encoded from, as recorded (None for image datasets)."""
    spec = manifest.get("latent") or {}
    return (spec.get("images") or {}).get("location")


def evaluation_dataset(location: str | os.PathLike[str]) -> str:
    """The dataset whose reference evaluator measures a model trained on ``location``: the dataset
    itself, or for a latent dataset the image dataset its latents were encoded from (the evaluator
    measures pixels, and a latent model generates pixels)."""
    loc = os.fspath(location)
    manifest = read_manifest(loc)
    if manifest.get("latent") is None:
        return loc
    images = images_location(manifest)
    if not images:
        raise DatasetError(f"{manifest_location(loc)}: the latent manifest names no image dataset")
    return images

"""Latent datasets: an image dataset encoded once by an autoencoder (``aigc data encode``).

The Stable Diffusion workflow (Rombach et al. 2022, *High-Resolution Image Synthesis with Latent
Diffusion Models*): an autoencoder compresses every image once, and the generative model learns
on the compressed latents, which are 8-48x smaller than the pixels. Encoding once, not in every
training step, is what makes that pay: the encoder runs once per image instead of once per epoch.

A latent dataset is an ordinary shard folder (``manifest.json`` with every shard's sha256, the
same train/val split and sample keys as its image dataset, ``aigc data verify`` works on it) whose
samples carry ``<key>.npy`` in place of the image, next to the same ``.txt`` caption and ``.json``:

- a KL autoencoder: the posterior mean, float32 ``(c, h, w)``, unscaled;
- a VQ autoencoder: the code indices, int16 ``(h, w)`` (the tokens of latent autoregression).

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
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from aigc.data.build import BuildSummary, _remove_stale, _swap_in
from aigc.data.loader_read import BadSample, ReadStats, decode_sample, iter_piece
from aigc.data.manifest import (
    FORMAT,
    DatasetError,
    compute_digest,
    manifest_location,
    read_manifest,
    sha256_file,
    shard_location,
    write_manifest,
)
from aigc.data.sample import Sample, new_skip_counts
from aigc.data.shards import SPLITS, ShardInfo, ShardWriter

__all__ = [
    "AUTOENCODER_DIR",
    "LATENT_EXT",
    "encode_npy",
    "decode_npy",
    "latent_spec",
    "resolve_autoencoder",
    "encode_dataset",
    "autoencoder_location",
    "images_location",
    "evaluation_dataset",
    "load_dataset_autoencoder",
]

LATENT_EXT = "npy"
#: the folder inside a latent dataset that holds the autoencoder's export
AUTOENCODER_DIR = "autoencoder"
_DTYPES = {"kl": "float32", "vq": "int16"}
_REGISTRY_REF = re.compile(r"^(models:/)?[A-Za-z0-9][\w.-]*(@[\w.-]+|/\d+)$")
Progress = Callable[[str], None]


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
        or spec.get("kind") not in _DTYPES
        or spec.get("dtype") != _DTYPES[spec["kind"]]
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


# ------------------------------------------------------------------------------------ the encoder


def resolve_autoencoder(
    ref: str, tracking_uri: str | None = None, progress: Progress | None = None
) -> tuple[Any, dict[str, Any]]:
    """The autoencoder module ``ref`` names and its lineage (what the manifest records).

    ``ref`` is, in this order: the ``--metrics-out`` record of an ``aigc train`` run (a local
    ``.json`` file with its ``run_id``: what the DVC pipeline's train stage writes), a registered
    version (``aigc-autoencoder@candidate``, ``aigc-autoencoder/3``, ``models:/...``), an export
    folder or ``.ckpt`` (path or URL), or the id or name of an ``aigc train`` run. A run, named or
    through its record, gives its final checkpoint, and the lineage names the run (and the record).
    """
    from aigc.evaluation.final import load_model_from

    say = progress or (lambda _m: None)
    lineage: dict[str, Any] = {"ref": ref}
    run_ref: str | None = None  # the run a --metrics-out record names
    if ref.endswith(".json") and "://" not in ref:
        # Before the path branch: a record points to a run; it is not a model file to load.
        from aigc.config import ConfigError
        from aigc.workflows.pipeline import run_of

        if not Path(ref).is_file():
            raise DatasetError(f"--autoencoder {ref}: no such file (an `aigc train --metrics-out` record)")
        try:
            run_ref = run_of(ref)
        except ConfigError as err:
            raise DatasetError(
                f"--autoencoder {ref}: not an `aigc train --metrics-out` record ({err}); give such a "
                "record, a registered version, an export folder, a .ckpt or a run id"
            ) from None
        lineage["record"] = str(Path(ref).resolve())
    if run_ref is None and _REGISTRY_REF.match(ref) and not Path(ref).exists():
        from aigc.registry.store import client_for, load_version, resolve_version

        client = client_for(tracking_uri)
        version = resolve_version(client, ref)
        say(f"autoencoder: {version.name} version {version.version} (run {version.run_id})")
        module = load_version(client, version)
        lineage |= {"model": version.name, "version": str(version.version), "run_id": version.run_id}
    elif run_ref is None and ("://" in ref or Path(ref).exists()):
        say(f"autoencoder: {ref}")
        module = load_model_from(ref)
        lineage["path"] = str(Path(ref).resolve()) if "://" not in ref else ref
    else:
        from aigc.registry.register import final_checkpoint, find_run
        from aigc.registry.store import client_for

        run = find_run(client_for(tracking_uri), run_ref or ref)
        storage = run.data.tags.get("aigc.storage")
        if not storage:
            raise DatasetError(f"--autoencoder {ref}: run {run.info.run_id} was not made by aigc train")
        checkpoint = final_checkpoint(storage)
        say(f"autoencoder: run {run.info.run_id}, {checkpoint}")
        module = load_model_from(checkpoint)
        lineage |= {"run_id": run.info.run_id, "checkpoint": checkpoint}
    if getattr(module, "family", None) != "autoencoder":
        raise DatasetError(
            f"--autoencoder {ref}: a {getattr(module, 'family', type(module).__name__)} model, "
            "not an autoencoder (train one with models/autoencoder-kl*.yaml or autoencoder-vq*.yaml)"
        )
    return module.eval(), lineage


def _encode_batch(module: Any, images: list[np.ndarray]) -> list[np.ndarray]:
    """uint8 images (H, W[, C]) -> one latent array per image: KL (c, h, w) float32, VQ (h, w) int16."""
    import torch

    x = torch.from_numpy(np.stack(images))
    if x.dim() == 3:
        x = x.unsqueeze(-1)
    x = x.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)  # (B, C, H, W) in [-1, 1]
    net = module.autoencoder
    with torch.no_grad():
        if net.kind == "vq":
            out = net.tokens(x).to(torch.int16)  # (B, h, w)
        else:
            out = net.latents(x).float()  # (B, c, h, w)
    return list(out.numpy())


def encode_dataset(
    dataset: str | os.PathLike[str],
    autoencoder: str,
    out: str | os.PathLike[str],
    *,
    name: str | None = None,
    batch_size: int = 256,
    threads: int | None = None,
    overwrite: bool = False,
    tracking_uri: str | None = None,
    progress: Progress | None = None,
) -> BuildSummary:
    """Encode every image of ``dataset`` with ``autoencoder`` into the latent dataset ``out``.

    Keeps the split, the keys, the captions, the metadata and the shard sizes of the image dataset;
    writes the autoencoder's export into ``out/autoencoder`` and the ``latent`` section into the
    manifest (see the module docstring). Like ``aigc data build``, the folder is written under a
    temporary name and swapped in whole; an existing ``out`` needs ``overwrite``.
    """
    import torch

    from aigc.data.version import version as data_version
    from aigc.models.export import export_model

    start = time.perf_counter()
    say = progress or (lambda _m: None)
    src = os.fspath(dataset)
    manifest = read_manifest(src)
    if latent_spec(manifest) is not None:
        raise DatasetError(f"{src} is already a latent dataset: encode its image dataset instead")
    target = Path(out).expanduser().absolute()
    if target.exists() and not overwrite:
        raise DatasetError(f"{target} already exists; pass --overwrite to re-encode it")
    module, lineage = resolve_autoencoder(autoencoder, tracking_uri, say)
    net = module.autoencoder
    size, channels = int(manifest["image_size"]), int(manifest["channels"])
    if (module.image_size, module.channels) != (size, channels):
        raise DatasetError(
            f"the autoencoder takes {module.channels}x{module.image_size}x{module.image_size} images; "
            f"{src} holds {channels}x{size}x{size}"
        )
    kind = net.kind
    shape = list(net.latent_shape) if kind == "kl" else list(net.latent_shape[1:])
    name = name or target.name
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)

    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(target)
    tmp = target.with_name(f".{target.name}.building-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    per_shard = int(manifest.get("samples_per_shard") or 100)
    max_bytes = int(manifest.get("max_shard_bytes") or 64 * 2**20)
    writers = {s: ShardWriter(tmp, s, per_shard, max_bytes) for s in SPLITS}
    skipped = new_skip_counts()
    total, sq_total, count = 0.0, 0.0, 0
    mode = "L" if channels == 1 else "RGB"
    try:
        for split in SPLITS:
            shards = manifest["splits"].get(split, {}).get("shards", [])
            n_split = sum(int(s["num_samples"]) for s in shards)
            done = 0
            for shard in shards:
                url = shard_location(src, shard["name"])
                stats = ReadStats(assigned=int(shard["num_samples"]))
                pending: list[tuple[str, np.ndarray, str, bytes]] = []
                for key, parts in iter_piece(url, 0, int(shard["num_samples"]), stats):
                    try:
                        image, caption, _ = decode_sample(parts, mode, size)
                    except BadSample as err:
                        stats.record_bad(url, key, str(err))
                        continue
                    pending.append((key, image, caption, parts.get("json", b"{}")))
                if stats.num_bad:
                    skipped["unreadable"] += stats.num_bad
                    say(f"  warning: {url}: skipped {stats.num_bad} unreadable samples")
                for i in range(0, len(pending), batch_size):
                    chunk = pending[i : i + batch_size]
                    latents = _encode_batch(module, [c[1] for c in chunk])
                    for (key, _, caption, meta_json), z in zip(chunk, latents, strict=True):
                        if split == "train" and kind == "kl":
                            z64 = z.astype(np.float64)  # running moments for LDM's scale
                            total, sq_total, count = (
                                total + z64.sum(),
                                sq_total + (z64**2).sum(),
                                count + z64.size,
                            )
                        meta = json.loads(meta_json or b"{}")
                        meta = meta if isinstance(meta, dict) else {}
                        meta |= {"latent_shape": shape, "image_key": key}
                        writers[split].write(Sample(key, encode_npy(z), LATENT_EXT, caption, meta))
                done += int(shard["num_samples"])
                say(f"  {split}: encoded {done}/{n_split} ({shard['name']})")
        infos: dict[str, list[ShardInfo]] = {s: w.close() for s, w in writers.items()}
        export_model(module, tmp / AUTOENCODER_DIR)
        scale = None
        if kind == "kl":
            mean = total / max(1, count)
            std = float(np.sqrt(max(sq_total / max(1, count) - mean**2, 1e-12)))
            scale = 1.0 / std
        splits = {
            s: {"num_samples": sum(i.num_samples for i in v), "shards": [i.to_json() for i in v]}
            for s, v in infos.items()
        }
        images = {
            "name": manifest["name"],
            "location": src if "://" in src else str(Path(src).resolve()),
            "version": data_version(src),
            "digest": manifest["digest"],
        }
        latent = {
            "kind": kind,
            "shape": shape,
            "dtype": _DTYPES[kind],
            "scale": scale,
            "codebook_size": getattr(net, "codebook_size", None) if kind == "vq" else None,
            "autoencoder": lineage,
            # what a latent model needs to rebuild the decoder's architecture (weights: autoencoder/)
            "autoencoder_model": module.model_cfg.model_dump(mode="json"),
            "autoencoder_sha256": sha256_file(tmp / AUTOENCODER_DIR / "weights.safetensors"),
            "images": images,
        }
        new_manifest = {
            "format": FORMAT,
            "name": name,
            "source": {"type": "latents", "path": images["location"], "autoencoder": lineage},
            "image_size": size,
            "channels": channels,
            "split_seed": manifest.get("split_seed"),
            "val_fraction": manifest.get("val_fraction"),
            "samples_per_shard": per_shard,
            "max_shard_bytes": max_bytes,
            "splits": splits,
            "skipped": skipped,
            "digest": compute_digest(splits),
            "latent": latent,
        }
        write_manifest(tmp, new_manifest)
        _swap_in(tmp, target)
    except BaseException:
        for w in writers.values():
            w.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(previous_threads)
    return BuildSummary(
        path=target,
        name=name,
        counts={s: v["num_samples"] for s, v in splits.items()},
        shards={s: len(v) for s, v in infos.items()},
        skipped=skipped,
        digest=new_manifest["digest"],
        seconds=time.perf_counter() - start,
    )


def load_dataset_autoencoder(location: str | os.PathLike[str], manifest: dict[str, Any] | None = None) -> Any:
    """The autoencoder module stored in a latent dataset, checked against the manifest's sha256."""
    import tempfile

    import fsspec

    from aigc.models.export import load_export

    loc = os.fspath(location)
    manifest = manifest or read_manifest(loc)
    spec = latent_spec(manifest)
    if spec is None:
        raise DatasetError(f"{manifest_location(loc)}: not a latent dataset (no latent section)")
    where = autoencoder_location(loc)
    with tempfile.TemporaryDirectory(prefix="aigc-autoencoder-") as tmp:
        for file in ("weights.safetensors", "config.json", "tokenizer.json"):
            try:
                with fsspec.open(f"{where}/{file}", "rb") as f_in, open(Path(tmp) / file, "wb") as f_out:
                    shutil.copyfileobj(f_in, f_out)
            except FileNotFoundError:
                raise DatasetError(
                    f"{where}/{file}: missing; re-encode the dataset (aigc data encode)"
                ) from None
        digest = sha256_file(Path(tmp) / "weights.safetensors")
        if digest != spec.get("autoencoder_sha256"):
            raise DatasetError(
                f"{where}/weights.safetensors: sha256 {digest[:12]} differs from the manifest's "
                f"{str(spec.get('autoencoder_sha256'))[:12]}; re-encode the dataset (aigc data encode)"
            )
        return load_export(tmp)

"""``aigc data encode``: an image dataset encoded once by an autoencoder into a latent dataset.

The autoencoder is named the way a user has it at hand (a training run's ``--metrics-out`` record,
a registered version, an export folder or checkpoint, a run's id or name), which takes the registry,
the tracking store, the training run folder and the evaluation's model loader: that is why this
lives in the workflows layer and not in :mod:`aigc.data`. What it writes is the format of
:mod:`aigc.data.latents`, through the same shard writer and atomic folder swap as ``aigc data build``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from aigc.data.build import BuildSummary
from aigc.data.latents import AUTOENCODER_DIR, LATENT_DTYPES, LATENT_EXT, encode_npy, latent_spec
from aigc.data.loader_read import BadSample, ReadStats, decode_sample, iter_piece
from aigc.data.manifest import (
    FORMAT,
    DatasetError,
    compute_digest,
    read_manifest,
    sha256_file,
    shard_location,
    write_manifest,
)
from aigc.data.sample import Sample, new_skip_counts
from aigc.data.shards import SPLITS, ShardInfo, ShardWriter
from aigc.data.staging import StagedFolder
from aigc.data.version import version as data_version

__all__ = ["encode_dataset", "resolve_autoencoder"]

Progress = Callable[[str], None]


class PipelineVAE:
    """The VAE of a diffusers pipeline folder, as ``--autoencoder`` names it (kind ``sd`` latents)."""

    family = "sd"

    def __init__(self, folder: str):
        from diffusers import AutoencoderKL

        from aigc.models.sd import local_pipeline

        self.vae = AutoencoderKL.from_pretrained(str(local_pipeline(folder)), subfolder="vae").eval()


def _is_pipeline_folder(ref: str) -> bool:
    p = Path(ref).expanduser()
    return p.is_dir() and (p / "vae").is_dir() and (p / "unet").is_dir()


def resolve_autoencoder(
    ref: str, tracking_uri: str | None = None, progress: Progress | None = None
) -> tuple[Any, dict[str, Any]]:
    """The autoencoder module ``ref`` names and its lineage (what the manifest records): see
    :func:`aigc.workflows.model_ref.resolve_model` for what ``ref`` may be. A model of the ``sd``
    family, or a diffusers pipeline folder itself, gives its VAE (``sd`` latents)."""
    from aigc.workflows.model_ref import ModelRefError, resolve_model

    if _is_pipeline_folder(ref):
        (progress or (lambda _m: None))(f"--autoencoder: the VAE of the diffusers pipeline {ref}")
        return PipelineVAE(ref), {"ref": ref, "pipeline": str(Path(ref).expanduser().resolve())}
    try:
        module, lineage = resolve_model(ref, tracking_uri, progress, option="--autoencoder")
    except ModelRefError as err:
        raise DatasetError(str(err)) from None
    if getattr(module, "family", None) == "sd":
        lineage["pipeline"] = module.model_cfg.pipeline
    elif getattr(module, "family", None) != "autoencoder":
        raise DatasetError(
            f"--autoencoder {ref}: a {getattr(module, 'family', type(module).__name__)} model, "
            "not an autoencoder (train one with models/autoencoder-kl*.yaml or autoencoder-vq*.yaml, "
            "or give an sd model or a diffusers pipeline folder for its VAE)"
        )
    return module, lineage


def _encode_batch(module: Any, images: list[np.ndarray]) -> list[np.ndarray]:
    """uint8 images (H, W[, C]) -> one latent array per image: KL (c, h, w) float32, VQ (h, w) int16."""
    import torch

    x = torch.from_numpy(np.stack(images))
    if x.dim() == 3:
        x = x.unsqueeze(-1)
    x = x.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)  # (B, C, H, W) in [-1, 1]
    if module.family == "sd":  # the pipeline's VAE: the posterior mean (unscaled)
        from aigc.models.sd import vae_posterior

        with torch.no_grad():
            z = vae_posterior(module.vae, x).mean
        return list(z.float().numpy())
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
    manifest (:mod:`aigc.data.latents`). Like ``aigc data build``, the folder is written under a
    temporary name and swapped in whole (:class:`~aigc.data.staging.StagedFolder`); an existing
    ``out`` needs ``overwrite``.
    """
    import torch

    from aigc.models.export import export_model

    start = time.perf_counter()
    say = progress or (lambda _m: None)
    src = os.fspath(dataset)
    manifest = read_manifest(src)
    if latent_spec(manifest) is not None:
        raise DatasetError(f"{src} is already a latent dataset: encode its image dataset instead")
    # Refuses an existing `out` before the autoencoder is loaded.
    staging = StagedFolder(out, overwrite=overwrite, action="re-encode")
    target = staging.target
    module, lineage = resolve_autoencoder(autoencoder, tracking_uri, say)
    size, channels = int(manifest["image_size"]), int(manifest["channels"])
    if module.family == "sd":
        net, vae = None, module.vae
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        if size % factor or channels not in (1, 3):
            raise DatasetError(
                f"the pipeline's VAE takes RGB (or grey) images whose size is a multiple of {factor}; "
                f"{src} holds {channels}x{size}x{size}"
            )
        kind, shape = "sd", [int(vae.config.latent_channels), size // factor, size // factor]
    else:
        net = module.autoencoder
        if (module.image_size, module.channels) != (size, channels):
            raise DatasetError(
                f"the autoencoder takes {module.channels}x{module.image_size}x{module.image_size} "
                f"images; {src} holds {channels}x{size}x{size}"
            )
        kind = net.kind
        shape = list(net.latent_shape) if kind == "kl" else list(net.latent_shape[1:])
    name = name or target.name
    per_shard = int(manifest.get("samples_per_shard") or 100)
    max_bytes = int(manifest.get("max_shard_bytes") or 64 * 2**20)
    skipped = new_skip_counts()
    total, sq_total, count = 0.0, 0.0, 0
    mode = "L" if channels == 1 else "RGB"
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        # Exits in reverse: an error aborts the writers, then removes the staging folder.
        with staging as tmp, ExitStack() as writing:
            writers = {s: writing.enter_context(ShardWriter(tmp, s, per_shard, max_bytes)) for s in SPLITS}
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
            if kind == "sd":  # the VAE alone, in diffusers' layout
                module.vae.save_pretrained(tmp / AUTOENCODER_DIR)
                weights = tmp / AUTOENCODER_DIR / "diffusion_pytorch_model.safetensors"
                autoencoder_model = json.loads(module.vae.to_json_string())
            else:
                export_model(module, tmp / AUTOENCODER_DIR)
                weights = tmp / AUTOENCODER_DIR / "weights.safetensors"
                autoencoder_model = module.model_cfg.model_dump(mode="json")
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
                "dtype": LATENT_DTYPES[kind],
                "scale": scale,
                "codebook_size": getattr(net, "codebook_size", None) if kind == "vq" else None,
                "autoencoder": lineage,
                # what a latent model needs to rebuild the decoder's architecture (weights: autoencoder/)
                "autoencoder_model": autoencoder_model,
                "autoencoder_sha256": sha256_file(weights),
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

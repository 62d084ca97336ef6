"""Loader throughput: samples/s through ShardDataModule vs decoding the same images from memory.

Part (a) of the loader benchmark, in two sections, each in this one process on one core:

- ``digits_png``: the 8x8 grey digits (PNG). The loader streams the train shards (tar parsing,
  JSON/caption decoding, shuffle buffer, PIL decode, batching); the baseline loops over the PNG
  bytes already in RAM (PIL decode -> float tensor in [-1, 1]). Target ratio >= 0.5.
- ``openmoji_jpeg64``: the emoji rendered at 64x64 RGB and stored as JPEG (quality 90), the size
  and format real image-text shards have. Baseline: PIL's own decode of the same JPEG bytes in a
  tight loop (``Image.open`` -> ``np.asarray``, nothing else). Target ratio >= 0.8. The loader
  decodes such JPEGs with libjpeg-turbo through ``simplejpeg`` (same pixels, ~4x PIL's rate), so
  the ratio can pass 1. Also printed:
  how many DataLoader workers (one core each) would feed one GPU training at 64 px, from the GPU's
  samples/s (``--gpu-samples-per-s``, what ``throughput.py --device cuda`` prints for
  ``diffusion-rgb64``) or, without it, an estimate from the config's counted FLOPs per sample and an
  assumed achieved ``--gpu-tflops``.

The loader side runs with the decoded-sample cache off (``decoded_cache_mb=0``): every timed epoch
reads and decodes, which is what a dataset bigger than the cache pays. Sides alternate epoch by
epoch; ratios are the median of per-round ratios. Each section also times the loader's own decoder
(``decode_image``) alone and splits a sample's microseconds into that decode and the rest of the
loader. Prints JSON.

    .venv/bin/python benchmarks/loader.py                  # both sections
    .venv/bin/python benchmarks/loader.py --sections digits_png --batch-size 64

Part (b), the data-stall ratio against the diffusion model, is ``benchmarks/data_stall.py``.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

# diffusion-rgb64's counted training FLOPs per sample (benchmarks/throughput.py; models/diffusion.md).
DIFFUSION_RGB64_GFLOP = 9.99


def memory_decode_rate(images: list[bytes], mode: str, repeats: int) -> list[float]:
    """Samples/s of PIL decode -> (C, H, W) float tensor in [-1, 1] over bytes held in RAM."""
    import numpy as np
    import torch
    from PIL import Image

    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for data in images:
            # Restricting PIL to the loader's decoders skips format probing: the fastest fair baseline.
            with Image.open(io.BytesIO(data), formats=["PNG", "JPEG", "WEBP"]) as im:
                arr = np.asarray(im.convert(mode))  # (H, W) or (H, W, 3) uint8
            x = torch.from_numpy(arr).float().div_(127.5).sub_(1.0)  # .float() copies: arr stays read-only
            if x.ndim == 2:
                x = x.unsqueeze(0)  # (1, H, W)
            else:
                x = x.permute(2, 0, 1)  # (3, H, W)
        rates.append(len(images) / (time.perf_counter() - start))
    return rates


def pil_decode_rate(images: list[bytes], mode: str, repeats: int) -> list[float]:
    """Samples/s of PIL's own decode (bytes in RAM -> uint8 array), nothing else."""
    import numpy as np
    from PIL import Image

    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for data in images:
            with Image.open(io.BytesIO(data), formats=["JPEG", "PNG"]) as im:
                np.asarray(im if im.mode == mode else im.convert(mode))
        rates.append(len(images) / (time.perf_counter() - start))
    return rates


def loader_rate(dm, loader, epoch: int) -> tuple[float, int]:
    """Samples/s (real samples, padding excluded) and batches of epoch ``epoch`` of ``loader``, the
    DataModule's train loader made once and iterated every epoch, as Lightning does."""
    dm.set_epoch(epoch)
    start = time.perf_counter()
    real = batches = 0
    for batch in loader:
        real += int(batch["valid"].sum())
        batches += 1
    return real / (time.perf_counter() - start), batches


def own_decode_rate(images: list[bytes], mode: str, size: int) -> float:
    """Samples/s of the loader's own decoder (``decode_image``: simplejpeg for JPEG at the dataset's
    size, else PIL) in a tight loop: what the loader's rate is left with once its decode is paid."""
    from aigc.data.loader_read import decode_image

    start = time.perf_counter()
    for data in images:
        decode_image(data, mode, size)
    return len(images) / (time.perf_counter() - start)


def jpeg_shards(png_folder: Path, out: Path, quality: int = 90) -> Path:
    """Copy a PNG shard folder to ``out`` with every image re-encoded as JPEG (same samples, keys,
    captions and shard sizes; a manifest of its own)."""
    from PIL import Image

    from aigc.data.loader_read import iter_tar_samples
    from aigc.data.manifest import compute_digest, read_manifest, write_manifest
    from aigc.data.sample import Sample
    from aigc.data.shards import ShardWriter

    manifest = read_manifest(png_folder)
    splits = {}
    for split, info in manifest["splits"].items():
        writer = ShardWriter(out, split, samples_per_shard=manifest["samples_per_shard"])
        for shard in info["shards"]:
            for key, parts in iter_tar_samples(png_folder / shard["name"]):
                with Image.open(io.BytesIO(parts["png"])) as im:
                    buf = io.BytesIO()
                    im.convert("RGB").save(buf, format="JPEG", quality=quality)
                meta = json.loads(parts["json"])
                writer.write(Sample(key, buf.getvalue(), "jpg", parts["txt"].decode(), meta))
        shards = writer.close()
        splits[split] = {
            "num_samples": sum(s.num_samples for s in shards),
            "shards": [s.to_json() for s in shards],
        }
    write_manifest(out, {**manifest, "name": out.name, "splits": splits, "digest": compute_digest(splits)})
    return out


def compare(folder: Path, args, baseline, target: float) -> dict:
    """Loader epochs vs ``baseline(images, mode, 1)`` rounds, alternated; a JSON-ready dict."""
    from aigc.config import DataConfig
    from aigc.data.loader import ShardDataModule
    from aigc.data.loader_read import iter_tar_samples
    from aigc.data.manifest import read_manifest

    manifest = read_manifest(folder)
    cfg = DataConfig(
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        shuffle_buffer=args.shuffle_buffer,
        image_size=manifest["image_size"],
        channels=manifest["channels"],
        decoded_cache_mb=0,  # every epoch reads and decodes: the cost of a dataset bigger than the cache
    )
    dm = ShardDataModule(cfg, folder)
    loader = dm.train_dataloader()
    shards = manifest["splits"]["train"]["shards"]
    images = [
        parts[ext]
        for s in shards
        for _, parts in iter_tar_samples(folder / s["name"])
        for ext in ("png", "jpg")
        if ext in parts
    ]
    mode = "L" if manifest["channels"] == 1 else "RGB"
    loader_rate(dm, loader, 0)  # warm-up: page cache, imports, worker start
    baseline(images, mode, 1)
    # Alternate the sides round by round so load from other processes hits them alike.
    loader_rates, baseline_rates, decode_rates, batches = [], [], [], 0
    for epoch in range(args.epochs):
        rate, n = loader_rate(dm, loader, epoch + 1)
        loader_rates.append(rate)
        batches += n
        baseline_rates += baseline(images, mode, 1)
        decode_rates.append(own_decode_rate(images, mode, manifest["image_size"]))
    ratios = [a / b for a, b in zip(loader_rates, baseline_rates, strict=True)]
    loader_us = 1e6 / statistics.median(loader_rates)
    decode_us = 1e6 / statistics.median(decode_rates)
    return {
        "dataset": manifest["name"],
        "image_size": manifest["image_size"],
        "channels": manifest["channels"],
        "format": sorted(
            {ext for s in shards[:1] for _, p in iter_tar_samples(folder / s["name"]) for ext in p}
        ),
        "train_samples": len(images),
        "train_shards": len(shards),
        "batches_per_epoch": batches // args.epochs,
        "loader_samples_per_s": round(statistics.median(loader_rates), 1),
        "baseline_samples_per_s": round(statistics.median(baseline_rates), 1),
        "ratio": round(statistics.median(ratios), 3),  # median of the per-round ratios
        "ratio_min": round(min(ratios), 3),
        "target_ratio": target,
        # Where a sample's time goes in the loader: its decode (decode_image alone, tight loop) and
        # the rest (tar parsing, caption and JSON, shuffle buffer, batch assembly and conversion).
        "own_decode_samples_per_s": round(statistics.median(decode_rates), 1),
        "us_per_sample": {
            "loader": round(loader_us, 1),
            "decode": round(decode_us, 1),
            "rest": round(loader_us - decode_us, 1),
        },
        "loader_samples_per_s_all": [round(r, 1) for r in loader_rates],
        "baseline_samples_per_s_all": [round(r, 1) for r in baseline_rates],
    }


def gpu_feed(loader_sps: float, args) -> dict:
    """DataLoader workers (one core each, at this machine's per-core loader rate) that one GPU
    training diffusion-rgb64 would need to never wait for data."""
    if args.gpu_samples_per_s:
        gpu_sps, source = args.gpu_samples_per_s, "--gpu-samples-per-s"
    else:
        gpu_sps = args.gpu_tflops * 1e3 / DIFFUSION_RGB64_GFLOP
        source = (
            f"estimate: {args.gpu_tflops} TFLOP/s achieved (--gpu-tflops, an assumption) / "
            f"{DIFFUSION_RGB64_GFLOP} GFLOP per sample (diffusion-rgb64, counted by throughput.py)"
        )
    return {
        "gpu_samples_per_s": round(gpu_sps, 1),
        "gpu_samples_per_s_from": source,
        "loader_workers_needed": math.ceil(gpu_sps / loader_sps),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sections", nargs="+", default=["digits_png", "openmoji_jpeg64"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers for the loader side")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (intra-op)")
    parser.add_argument("--epochs", type=int, default=5, help="timed epochs per side (median reported)")
    parser.add_argument("--shuffle-buffer", type=int, default=500)
    parser.add_argument(
        "--dataset",
        type=Path,
        default=None,
        help="digits_png: an existing shard folder instead of the digits",
    )
    parser.add_argument(
        "--gpu-samples-per-s", type=float, default=None, help="measured GPU training rate at 64 px"
    )
    parser.add_argument("--gpu-tflops", type=float, default=100.0, help="assumed achieved TFLOP/s without it")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from aigc.config import DataConfig
    from aigc.data.build import build_dataset

    out = {
        "benchmark": "loader_vs_memory_decode",
        "batch_size": args.batch_size,
        "dataloader_workers": args.num_workers,
        "torch_threads": torch.get_num_threads(),
        "shuffle_buffer": args.shuffle_buffer,
        "epochs_timed": args.epochs,
        "cpu_count": os.cpu_count(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        if "digits_png" in args.sections:
            folder = args.dataset
            if folder is None:
                folder = Path(tmp) / "digits"
                build_dataset(DataConfig(), folder)
            out["digits_png"] = {
                "baseline": "PIL decode of the PNG bytes -> float tensor in [-1, 1]",
                **compare(folder, args, memory_decode_rate, 0.5),
            }
        if "openmoji_jpeg64" in args.sections:
            png = Path(tmp) / "openmoji64"
            build_dataset(DataConfig(name=png.name, source="openmoji", image_size=64, channels=3), png)
            result = compare(jpeg_shards(png, Path(tmp) / "openmoji64-jpeg"), args, pil_decode_rate, 0.8)
            out["openmoji_jpeg64"] = {
                "baseline": "PIL decode of the JPEG bytes -> uint8 array, tight loop",
                **result,
                **gpu_feed(result["loader_samples_per_s"], args),
            }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

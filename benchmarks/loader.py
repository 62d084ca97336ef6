"""Loader throughput: samples/s through ShardDataModule vs decoding the same PNGs from memory.

Part (a) of the loader benchmark. Both sides run in this one process, on the same images, one after
the other: the loader streams the train shards (tar parsing, JSON/caption decoding, shuffle buffer,
PIL decode, batching); the baseline loops over PNG bytes already in RAM (PIL decode -> float
tensor in [-1, 1]) on one core. The ratio is loader / baseline (target >= 0.5). Prints JSON.

    .venv/bin/python benchmarks/loader.py --batch-size 64 --num-workers 0 --threads 1

Part (b), the data-stall ratio against the diffusion model, is ``benchmarks/data_stall.py``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path


def memory_decode_rate(pngs: list[bytes], mode: str, repeats: int) -> list[float]:
    """Samples/s of PIL decode -> (C, H, W) float tensor in [-1, 1] over bytes held in RAM."""
    import numpy as np
    import torch
    from PIL import Image

    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for data in pngs:
            # Restricting PIL to the loader's decoders skips format probing: the fastest fair baseline.
            with Image.open(io.BytesIO(data), formats=["PNG", "JPEG", "WEBP"]) as im:
                arr = np.asarray(im.convert(mode))  # (H, W) or (H, W, 3) uint8
            x = torch.from_numpy(arr).float().div_(127.5).sub_(1.0)  # .float() copies: arr stays read-only
            if x.ndim == 2:
                x = x.unsqueeze(0)  # (1, H, W)
            else:
                x = x.permute(2, 0, 1)  # (3, H, W)
        rates.append(len(pngs) / (time.perf_counter() - start))
    return rates


def loader_rate(dm, epoch: int) -> tuple[float, int]:
    """Samples/s (real samples, padding excluded) and batches of one train epoch via the DataModule."""
    dm.set_epoch(epoch)
    loader = dm.train_dataloader()
    start = time.perf_counter()
    real = batches = 0
    for batch in loader:
        real += int(batch["valid"].sum())
        batches += 1
    return real / (time.perf_counter() - start), batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers for the loader side")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (intra-op)")
    parser.add_argument("--epochs", type=int, default=5, help="timed epochs per side (median reported)")
    parser.add_argument("--shuffle-buffer", type=int, default=500)
    parser.add_argument(
        "--dataset",
        type=Path,
        default=None,
        help="an existing shard folder; default: build digits shards into a temp dir",
    )
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from aigc.config import DataConfig
    from aigc.data.loader import ShardDataModule
    from aigc.data.shards import build_dataset, iter_tar_samples, read_manifest

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.dataset
        if folder is None:
            folder = Path(tmp) / "digits"
            build_dataset(DataConfig(), folder)
        manifest = read_manifest(folder)
        cfg = DataConfig(
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            shuffle_buffer=args.shuffle_buffer,
            image_size=manifest["image_size"],
            channels=manifest["channels"],
        )
        dm = ShardDataModule(cfg, folder)
        shards = manifest["splits"]["train"]["shards"]
        pngs = [
            parts[ext]
            for s in shards
            for _, parts in iter_tar_samples(folder / s["name"])
            for ext in ("png", "jpg")
            if ext in parts
        ]

        loader_rate(dm, 0)  # warm-up: page cache, imports, worker start
        memory_decode_rate(pngs, "L" if manifest["channels"] == 1 else "RGB", 1)
        # Alternate the two sides round by round so load from other processes hits both alike.
        loader_rates, memory_rates, batches = [], [], 0
        for epoch in range(args.epochs):
            rate, n = loader_rate(dm, epoch + 1)
            loader_rates.append(rate)
            batches += n
            memory_rates += memory_decode_rate(pngs, "L" if manifest["channels"] == 1 else "RGB", 1)

    loader_sps, memory_sps = statistics.median(loader_rates), statistics.median(memory_rates)
    ratios = [a / b for a, b in zip(loader_rates, memory_rates, strict=True)]
    print(
        json.dumps(
            {
                "benchmark": "loader_vs_memory_decode",
                "dataset": manifest["name"],
                "image_size": manifest["image_size"],
                "channels": manifest["channels"],
                "train_samples": len(pngs),
                "train_shards": len(shards),
                "batch_size": args.batch_size,
                "dataloader_workers": args.num_workers,
                "torch_threads": torch.get_num_threads(),
                "shuffle_buffer": args.shuffle_buffer,
                "epochs_timed": args.epochs,
                "batches_per_epoch": batches // args.epochs,
                "loader_samples_per_s": round(loader_sps, 1),
                "memory_decode_samples_per_s": round(memory_sps, 1),
                "ratio": round(statistics.median(ratios), 3),  # median of the per-round ratios
                "ratio_min": round(min(ratios), 3),
                "target_ratio": 0.5,
                "loader_samples_per_s_all": [round(r, 1) for r in loader_rates],
                "memory_decode_samples_per_s_all": [round(r, 1) for r in memory_rates],
                "cpu_count": os.cpu_count(),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()

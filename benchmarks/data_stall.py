"""Data-stall ratio: seconds per training step of the shipped diffusion config fed by the shard
DataModule vs fed by batches already in memory, same model, batch and threads, in one run.
Target <= 1.05. (Part (b) of the loader benchmark; part (a) is loader.py.)

Two loader sides, each one DataModule whose loader is iterated epoch after epoch as Lightning does:
with the decoded-sample cache (the default, ``stall_ratio``: steady state after the first epoch) and
without it (``uncached_stall_ratio``: what a dataset bigger than the cache sees). Also printed: the
loader's own read + decode time per sample on one core, next to the step's time per sample.

    .venv/bin/python benchmarks/data_stall.py [--config models/diffusion.yaml] [--steps 60] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

from common import ROOT, digits_dataset
from common import workdir as make_workdir
from loader import loader_rate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", type=Path, default=ROOT / "models" / "diffusion.yaml")
    p.add_argument("--steps", type=int, default=60, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    import torch

    from aigc.config import load_config
    from aigc.data.captions_io import read_captions
    from aigc.data.loader import ShardDataModule
    from aigc.models import build_module
    from aigc.models.text import Tokenizer

    warnings.filterwarnings("ignore")
    torch.set_num_threads(a.threads)
    dataset = digits_dataset(make_workdir())
    cfg = load_config(a.config, [f"data.location={dataset}"])
    torch.manual_seed(0)
    module = build_module(
        cfg, Tokenizer.build(read_captions(dataset, "train")), cfg.data.image_size, cfg.data.channels
    )
    opt = torch.optim.AdamW(module.parameters(), lr=cfg.trainer.lr)

    def step(batch, i):
        loss = module.training_step(batch, i)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if hasattr(module, "update_ema"):
            module.update_ema()

    def make_stream(cache_mb: int):
        """Endless batches from ONE loader iterated epoch after epoch, as Lightning uses it (its
        persistent DataLoader workers keep their decoded-sample caches between epochs)."""
        dm = ShardDataModule(cfg.data.model_copy(update={"decoded_cache_mb": cache_mb}), location=dataset)
        loader = dm.train_dataloader()

        def stream(epoch: int):
            while True:
                dm.set_epoch(epoch)
                yield from loader
                epoch += 1

        return stream

    streams = {"cached": make_stream(cfg.data.decoded_cache_mb), "uncached": make_stream(0)}
    in_memory = [b for _, b in zip(range(a.steps), streams["uncached"](100), strict=False)]
    for stream in streams.values():  # warm-up: worker start, and the cache filled by epoch 0
        for i, b in zip(range(a.steps), stream(0), strict=False):
            step(b, i)
    seconds = {"memory": [], "cached": [], "uncached": []}
    for r in range(a.rounds):  # alternate so background load hits every side alike
        for name in ("cached", "memory", "uncached"):
            batches = streams[name](r + 1) if name != "memory" else iter(in_memory)
            t0 = time.perf_counter()
            for i in range(a.steps):
                step(next(batches), i)
            seconds[name].append((time.perf_counter() - t0) / a.steps)
    ms, cs, us = (statistics.median(seconds[k]) for k in ("memory", "cached", "uncached"))
    decode_s = decode_seconds_per_sample(cfg.data, dataset)
    print(
        json.dumps(
            {
                "benchmark": "data_stall",
                "model": cfg.model.family,
                "config": str(a.config),
                "batch_size": cfg.data.batch_size,
                "dataloader_workers": cfg.data.num_workers,
                "torch_threads": a.threads,
                "steps_per_round": a.steps,
                "rounds": a.rounds,
                "memory_seconds_per_step": round(ms, 5),
                "loader_seconds_per_step": round(cs, 5),
                "stall_ratio": round(cs / ms, 3),
                "uncached_loader_seconds_per_step": round(us, 5),
                "uncached_stall_ratio": round(us / ms, 3),
                "target_ratio": 1.05,
                "decoded_cache_mb": cfg.data.decoded_cache_mb,
                # What a dataset too big for the cache pays: reading + decoding one sample on one
                # core, next to the training step's own time per sample.
                "loader_decode_ms_per_sample": round(1e3 * decode_s, 4),
                "step_ms_per_sample": round(1e3 * ms / cfg.data.batch_size, 4),
            }
        )
    )


def decode_seconds_per_sample(data_cfg, dataset) -> float:
    """Seconds per sample for one uncached epoch read in this process (tar parse, decode, batching),
    best of 3 (``loader.py``'s loader side)."""
    import torch

    from aigc.data.loader import ShardDataModule

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    dm = ShardDataModule(data_cfg.model_copy(update={"num_workers": 0, "decoded_cache_mb": 0}), dataset)
    loader = dm.train_dataloader()
    best_rate = max(loader_rate(dm, loader, epoch)[0] for epoch in range(3))
    torch.set_num_threads(threads)
    return 1 / best_rate


if __name__ == "__main__":
    main()

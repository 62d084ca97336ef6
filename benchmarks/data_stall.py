"""Data-stall ratio: seconds per training step of the shipped diffusion config fed by the shard
DataModule vs fed by batches already in memory, same model, batch and threads, in one run.
Target <= 1.05. (Part (b) of the loader benchmark; part (a) is loader.py.)

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
    dm = ShardDataModule(cfg.data, location=dataset)

    def step(batch, i):
        loss = module.training_step(batch, i)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if hasattr(module, "update_ema"):
            module.update_ema()

    def stream(epoch0: int):
        epoch = epoch0
        while True:
            dm.set_epoch(epoch)
            yield from dm.train_dataloader()
            epoch += 1

    in_memory = [b for _, b in zip(range(a.steps), stream(100), strict=False)]
    for i, b in enumerate(in_memory[:10]):  # warm-up both paths
        step(b, i)
    loader_s, memory_s = [], []
    for r in range(a.rounds):  # alternate so background load hits both alike
        batches = stream(r)
        t0 = time.perf_counter()
        for i in range(a.steps):
            step(next(batches), i)
        loader_s.append((time.perf_counter() - t0) / a.steps)
        batches.close()
        t0 = time.perf_counter()
        for i, b in enumerate(in_memory):
            step(b, i)
        memory_s.append((time.perf_counter() - t0) / a.steps)
    ls, ms = statistics.median(loader_s), statistics.median(memory_s)
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
                "loader_seconds_per_step": round(ls, 5),
                "memory_seconds_per_step": round(ms, 5),
                "stall_ratio": round(ls / ms, 3),
                "target_ratio": 1.05,
            }
        )
    )


if __name__ == "__main__":
    main()

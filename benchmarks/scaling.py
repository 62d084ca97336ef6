"""Samples/s of `aigc train` with 2 workers x 1 thread vs the best plain single process (2 threads)
on this machine, same model, per-rank batch and data. Target >= 1.1x (measured ceiling here about
1.21x before gradient sync).

    .venv/bin/python benchmarks/scaling.py [--config models/diffusion.yaml] [--steps 120]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import ROOT, bench_overrides, digits_dataset, plain_loop, run_aigc_train, steady_seconds_per_step
from common import workdir as make_workdir


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", type=Path, default=ROOT / "models" / "diffusion.yaml")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--skip", type=int, default=20)
    a = p.parse_args()
    work = make_workdir()
    dataset = digits_dataset(work)
    from aigc.config import load_config

    cfg = load_config(a.config)
    overrides = bench_overrides(work, dataset, a.steps, workers=2, threads=1)
    uri, run_id, _ = run_aigc_train(a.config, overrides, name="scaling-2x1")
    per_step = steady_seconds_per_step(uri, run_id, a.skip)
    aigc_sps = 2 * cfg.data.batch_size / per_step  # two ranks, each a full batch per step

    best = None
    for threads in (1, 2):  # in this process: a spawned child ran the loop 2-3x slower here
        plain_overrides = bench_overrides(work, dataset, a.steps, workers=1, threads=threads)
        r = plain_loop(a.config, plain_overrides, threads, a.steps, a.skip)
        if best is None or r["samples_per_s"] > best[1]:
            best = (threads, r["samples_per_s"])
    print(
        json.dumps(
            {
                "benchmark": "scaling",
                "model": cfg.model.family,
                "batch_size_per_rank": cfg.data.batch_size,
                "dataloader_workers": cfg.data.num_workers,
                "aigc_workers": 2,
                "threads_per_worker": 1,
                "aigc_samples_per_s": round(aigc_sps, 1),
                "plain_best_threads": best[0],
                "plain_samples_per_s": round(best[1], 1),
                "speedup": round(aigc_sps / best[1], 3),
                "target_speedup": 1.1,
            }
        )
    )


if __name__ == "__main__":
    main()

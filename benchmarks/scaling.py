"""Samples/s of `aigc train` with 2 workers x 1 thread vs the best plain single process, against the
ceiling measured in the same run.

The plain loop runs with 1 and with 2 threads (same model, per-rank batch and data). Two perfectly
independent 1-thread workers would train at twice the 1-thread rate, so the ceiling of the speedup
over the best plain process is ``2 x rate(1 thread) / best rate``. The figure is the speedup as a
fraction of that ceiling (target >= 0.95). Below it are gradient synchronisation, the Lightning/Ray
loop, each rank's DataLoader process competing for the same cores, and the ranks sharing memory
bandwidth; this script does not tell them apart.

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

    rates = {}
    for threads in (1, 2):  # in this process: a spawned child ran the loop 2-3x slower here
        plain_overrides = bench_overrides(work, dataset, a.steps, workers=1, threads=threads)
        rates[threads] = plain_loop(a.config, plain_overrides, threads, a.steps, a.skip)["samples_per_s"]
    best = max(rates.items(), key=lambda item: item[1])
    ceiling = 2 * rates[1] / best[1]
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
                "plain_samples_per_s_1_thread": round(rates[1], 1),
                "plain_samples_per_s_2_threads": round(rates[2], 1),
                "plain_best_threads": best[0],
                "speedup": round(aigc_sps / best[1], 3),
                "ceiling": round(ceiling, 3),
                "fraction_of_ceiling": round(aigc_sps / best[1] / ceiling, 3),
                "target_fraction": 0.95,
            }
        )
    )


if __name__ == "__main__":
    main()

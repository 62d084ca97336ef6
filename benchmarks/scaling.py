"""Samples/s of `aigc train` with 2 workers x 1 thread vs the best plain single process, against the
ceiling measured in the same run, and where the rest of the way to the ceiling goes.

The plain loop runs with 1 and with 2 threads (same model, per-rank batch and data). Two perfectly
independent 1-thread workers would train at twice the 1-thread rate, so the ceiling of the speedup
over the best plain process is ``2 x rate(1 thread) / best rate``. The figure is the speedup as a
fraction of that ceiling (target >= 0.95).

Four more sides split the distance from twice the 1-thread rate down to `aigc train`, each a factor:

- ``machine``: two plain 1-thread processes at once, independent (``plain_process.py``), over twice
  one alone: what the two cores give two processes (shared caches, memory bandwidth, the VM);
- ``gradient_sync``: the same two processes as the ranks of one DDP job over gloo on 127.0.0.1, no
  Ray, over the independent pair: DDP's all-reduce and the lock-step it imposes;
- ``ray_worker_env``: that DDP plain loop in two bare Ray Train V2 workers (``ray_plain_loop.py
  --workers 2``) over the same without Ray: Ray's processes beside the ranks, its worker setup;
- ``aigc_and_lightning``: `aigc train` over the bare Ray DDP loop.

Their product is `aigc train` over twice the 1-thread rate. The sides alternate ``--rounds`` times;
every figure is the median of its rounds' ratios (this machine's speed moves by 10-25 % within a
minute). Prints JSON.

    .venv/bin/python benchmarks/scaling.py [--config models/diffusion.yaml] [--steps 220] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from common import (
    ROOT,
    bench_overrides,
    digits_dataset,
    median_ratio,
    plain_loop,
    plain_processes,
    ray_plain_loop,
    run_aigc_train,
    steady_seconds_per_step,
)
from common import workdir as make_workdir

TARGET = 0.95


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", type=Path, default=ROOT / "models" / "diffusion.yaml")
    p.add_argument("--steps", type=int, default=220)
    p.add_argument("--skip", type=int, default=40)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    work = make_workdir()
    dataset = digits_dataset(work)
    from aigc.config import load_config

    cfg = load_config(a.config)
    batch = cfg.data.batch_size  # per rank
    two = bench_overrides(work, dataset, a.steps, workers=2, threads=1)
    sides: dict[str, list[float]] = {
        k: [] for k in ("aigc", "ray_ddp", "ddp", "two_processes", "plain_1", "plain_2")
    }
    for r in range(a.rounds):  # samples/s of every side, round by round
        uri, run_id, _ = run_aigc_train(a.config, two, name=f"scaling-2x1-r{r}")
        sides["aigc"].append(2 * batch / steady_seconds_per_step(uri, run_id, a.skip))  # two ranks
        ray = ray_plain_loop(a.config, two, 1, a.steps, a.skip, work, f"scaling-r{r}", workers=2)
        sides["ray_ddp"].append(2 * ray["samples_per_s"])
        for key, ddp in (("ddp", True), ("two_processes", False)):
            ranks = plain_processes(a.config, two, 1, a.steps, a.skip, work, f"{key}-r{r}", ddp=ddp)
            sides[key].append(sum(x["samples_per_s"] for x in ranks))
        for threads in (1, 2):  # in this process: torch.set_num_threads(threads) inside
            one = bench_overrides(work, dataset, a.steps, workers=1, threads=threads)
            sides[f"plain_{threads}"].append(
                plain_loop(a.config, one, threads, a.steps, a.skip)["samples_per_s"]
            )

    best = [max(x, y) for x, y in zip(sides["plain_1"], sides["plain_2"], strict=True)]
    twice_one = [2 * x for x in sides["plain_1"]]
    ceilings = [t / b for t, b in zip(twice_one, best, strict=True)]
    fractions = [x / b / c for x, b, c in zip(sides["aigc"], best, ceilings, strict=True)]
    print(
        json.dumps(
            {
                "benchmark": "scaling",
                "model": cfg.model.family,
                "batch_size_per_rank": batch,
                "dataloader_workers": cfg.data.num_workers,
                "aigc_workers": 2,
                "threads_per_worker": 1,
                "steps": a.steps,
                "warmup_steps_skipped": a.skip,
                "rounds": a.rounds,
                "samples_per_s": {k: round(statistics.median(v), 1) for k, v in sides.items()},
                "speedup": median_ratio(sides["aigc"], best),
                "ceiling": round(statistics.median(ceilings), 3),
                "fraction_of_ceiling": round(statistics.median(fractions), 3),
                "target_fraction": TARGET,
                # Each factor is one side over the next; their product is aigc over twice 1 thread.
                "factors": {
                    "machine": median_ratio(sides["two_processes"], twice_one),
                    "gradient_sync": median_ratio(sides["ddp"], sides["two_processes"]),
                    "ray_worker_env": median_ratio(sides["ray_ddp"], sides["ddp"]),
                    "aigc_and_lightning": median_ratio(sides["aigc"], sides["ray_ddp"]),
                },
                "samples_per_s_all": {k: [round(x, 1) for x in v] for k, v in sides.items()},
            }
        )
    )


if __name__ == "__main__":
    main()

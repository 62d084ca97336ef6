"""Steady-state seconds per step of `aigc train` (1 worker, T threads) vs a plain PyTorch loop with T
threads on the same model, batch and data, in one run, for T = 1 and 2. Target ratio <= 1.03.

    .venv/bin/python benchmarks/train_overhead.py [--config models/diffusion.yaml] [--steps 120]
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
    p.add_argument("--skip", type=int, default=20, help="warm-up steps left out of the timing")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    a = p.parse_args()
    work = make_workdir()
    dataset = digits_dataset(work)
    results = []
    for t in a.threads:
        overrides = bench_overrides(work, dataset, a.steps, workers=1, threads=t)
        uri, run_id, _ = run_aigc_train(a.config, overrides, name=f"overhead-t{t}")
        aigc_s = steady_seconds_per_step(uri, run_id, a.skip)
        # In this process (torch.set_num_threads(t) inside): a spawned child ran the same loop
        # 2-3x slower here, which made the baseline, not aigc, the thing measured.
        plain = plain_loop(a.config, overrides, t, a.steps, a.skip)
        results.append(
            {
                "threads": t,
                "aigc_seconds_per_step": round(aigc_s, 5),
                "plain_seconds_per_step": round(plain["seconds_per_step"], 5),
                "ratio": round(aigc_s / plain["seconds_per_step"], 3),
            }
        )
    from aigc.config import load_config

    cfg = load_config(a.config)
    print(
        json.dumps(
            {
                "benchmark": "train_overhead",
                "model": cfg.model.family,
                "config": str(a.config),
                "batch_size": cfg.data.batch_size,
                "dataloader_workers": cfg.data.num_workers,
                "steps": a.steps,
                "warmup_steps_skipped": a.skip,
                "target_ratio": 1.03,
                "results": results,
            }
        )
    )


if __name__ == "__main__":
    main()

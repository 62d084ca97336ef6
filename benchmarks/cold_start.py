"""Seconds from the `aigc train` call to the first optimiser step, with the breakdown: imports,
preparation (config, tokenizer, MLflow run), Ray start, worker start, first batch, first step.
Target <= 15 s (a bare toy job measured 18.7 s here).

    .venv/bin/python benchmarks/cold_start.py [--config models/diffusion.yaml] [--workers 1]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import ROOT, bench_overrides, digits_dataset, run_aigc_train
from common import workdir as make_workdir


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", type=Path, default=ROOT / "models" / "diffusion.yaml")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--repeat", type=int, default=2)
    a = p.parse_args()
    from mlflow.tracking import MlflowClient

    work = make_workdir()
    dataset = digits_dataset(work)
    runs = []
    for i in range(a.repeat):
        overrides = bench_overrides(work, dataset, steps=3, workers=a.workers, threads=1)
        uri, run_id, wall = run_aigc_train(a.config, overrides, name=f"cold-{i}")
        m = MlflowClient(uri).get_run(run_id).data.metrics
        total = m["startup/imports_s"] + m["startup/first_step_s"]
        runs.append(
            {
                "total_s": round(total, 2),
                "imports_s": round(m["startup/imports_s"], 2),
                "prepare_s": round(m["startup/prepare_s"], 2),
                "ray_start_s": round(m["startup/ray_s"], 2),
                "worker_start_s": round(
                    m["startup/worker_s"] - m["startup/prepare_s"] - m["startup/ray_s"], 2
                ),
                "first_batch_s": round(m["startup/first_batch_s"] - m["startup/worker_s"], 2),
                "first_step_s": round(m["startup/first_step_s"] - m["startup/first_batch_s"], 2),
                "command_wall_s": round(wall, 2),
            }
        )
    print(
        json.dumps(
            {
                "benchmark": "cold_start",
                "config": str(a.config),
                "workers": a.workers,
                "threads_per_worker": 1,
                "target_s": 15.0,
                "best_total_s": min(r["total_s"] for r in runs),
                "runs": runs,
            }
        )
    )


if __name__ == "__main__":
    main()

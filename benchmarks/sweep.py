"""A sweep's wall-clock with trials in parallel vs the same trials one after another.

Runs the real ``aigc sweep`` twice in this run, on the same machine, with the same trials (same
space, seed, config): ``--concurrent N`` (default 2) and ``--concurrent 1``, FIFO (no trial stopped
early, so both sides train the same steps), each trial one Ray Train worker with
``--threads`` torch threads. Prints JSON: both wall-clocks (the whole command: Ray's start, every
trial's job, the table), the ratio serial / concurrent (the speed-up; ideal N on N free cores), and
what it was measured with.

    .venv/bin/python benchmarks/sweep.py                       # 4 trials of 60 steps, 2 vs 1 at a time
    .venv/bin/python benchmarks/sweep.py --trials 6 --steps 200
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import AIGC, ROOT, digits_dataset, workdir  # noqa: E402

TINY = [  # tests/tiny.py's diffusion model: the figure is the platform's, not the model's
    "model.base_channels=16",
    "model.text.dim=32",
    "model.text.layers=1",
    "model.text.heads=2",
    "model.heads=2",
    "model.sample_steps=4",
]


def run_sweep(work: Path, dataset: Path, name: str, trials: int, concurrent: int, steps: int, threads: int):
    sets = [
        *TINY,
        f"data.location={dataset}",
        "data.batch_size=32",
        "data.num_workers=0",
        f"trainer.max_steps={steps}",
        "trainer.log_every_steps=10",
        "trainer.val_every_steps=10",
        "trainer.limit_val_batches=2",
        f"trainer.checkpoint_every_steps={steps}",
        f"trainer.sample_every_steps={10 * steps}",
        f"trainer.threads_per_worker={threads}",
        f"scaling.cpus_per_worker={threads}",
        f"scaling.storage_path={work / 'runs'}",
        f"tracking.uri=sqlite:///{work / 'mlflow.db'}",
        "tracking.experiment=benchmarks",
        "tracking.system_metrics=false",
    ]
    cmd = [
        AIGC,
        "sweep",
        str(ROOT / "models" / "diffusion.yaml"),
        "--param=trainer.lr=loguniform:1e-4:1e-2",
        f"--trials={trials}",
        f"--concurrent={concurrent}",
        "--workers=1",
        "--seed=0",
        f"--name={name}",
        *(f"--set={s}" for s in sets),
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=work)
    seconds = time.perf_counter() - t0
    if out.returncode != 0:
        sys.exit(f"aigc sweep failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return seconds, out.stdout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--concurrent", type=int, default=2)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--threads", type=int, default=1, help="torch threads (and CPUs) per trial's worker")
    a = p.parse_args()
    work = workdir()
    dataset = digits_dataset(work)
    parallel, table_p = run_sweep(work, dataset, "parallel", a.trials, a.concurrent, a.steps, a.threads)
    serial, table_s = run_sweep(work, dataset, "serial", a.trials, 1, a.steps, a.threads)
    print(table_p.split("\n\n")[-1], file=sys.stderr)
    print(
        json.dumps(
            {
                "figure": "sweep wall-clock, one trial at a time / concurrent trials (speed-up)",
                "ratio_serial_over_concurrent": round(serial / parallel, 3),
                "concurrent_s": round(parallel, 1),
                "serial_s": round(serial, 1),
                "trials": a.trials,
                "concurrent": a.concurrent,
                "steps_per_trial": a.steps,
                "workers_per_trial": 1,
                "threads_per_worker": a.threads,
                "cpus": os.cpu_count(),
                "scheduler": "fifo",
                "work": str(work),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()

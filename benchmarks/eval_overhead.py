"""What evaluating during training costs the training steps: `aigc train` (1 worker, 1 thread) with
``trainer.eval_every_steps`` against the same job without it, steady seconds per step, in one run.

Both sides save a checkpoint at the same steps (``--every``); only the evaluation differs. The
evaluation runs in a Ray Train validation task beside the worker (``aigc.training.validation``), on
the embedded Ray's other CPU (``trainer.eval_cpus=1``): the ratio is what that task costs the
worker's steps on this 2-core machine (memory bandwidth, the checkpoint it reads, its MLflow
writes), not a stall: no step waits for an evaluation. ``--eval-cpus 0`` measures the task sharing
the worker's core instead. The sides alternate ``--rounds`` times; the ratio is the median of the
rounds' ratios (this shared machine's speed moves by 10-25 % within a minute).

    .venv/bin/python benchmarks/eval_overhead.py [--config models/diffusion.yaml] [--steps 200]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import (
    ROOT,
    bench_overrides,
    digits_dataset,
    median_ratio,
    run_aigc_train,
    steady_seconds_per_step,
)
from common import workdir as make_workdir


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", type=Path, default=ROOT / "models" / "diffusion.yaml")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--skip", type=int, default=20, help="warm-up steps left out of the timing")
    p.add_argument("--every", type=int, default=40, help="checkpoint (and evaluation) every N steps")
    p.add_argument("--eval-samples", type=int, default=100, help="samples per evaluation")
    p.add_argument("--eval-cpus", type=float, default=1.0, help="CPUs the evaluation task reserves")
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args()
    work = make_workdir()
    dataset = digits_dataset(work)
    base = bench_overrides(work, dataset, a.steps, workers=1, threads=1)
    base.append(f"trainer.checkpoint_every_steps={a.every}")
    evaluating = [
        f"trainer.eval_every_steps={a.every}",
        f"trainer.eval_samples={a.eval_samples}",
        f"trainer.eval_cpus={a.eval_cpus}",
    ]
    plain, with_eval, evaluations = [], [], []
    for r in range(a.rounds):
        uri, run_id, _ = run_aigc_train(a.config, base, f"no-eval-{r}-{time.time_ns()}")
        plain.append(steady_seconds_per_step(uri, run_id, a.skip))
        uri, run_id, _ = run_aigc_train(a.config, base + evaluating, f"eval-{r}-{time.time_ns()}")
        with_eval.append(steady_seconds_per_step(uri, run_id, a.skip))
        from mlflow.tracking import MlflowClient

        evaluations.append(len(MlflowClient(uri).get_metric_history(run_id, "eval/fd")))
    result = {
        "benchmark": "eval_overhead",
        "config": str(a.config.relative_to(ROOT)) if a.config.is_relative_to(ROOT) else str(a.config),
        "steps": a.steps,
        "every": a.every,
        "eval_samples": a.eval_samples,
        "eval_cpus": a.eval_cpus,
        "workers": 1,
        "threads": 1,
        "seconds_per_step_without": plain,
        "seconds_per_step_with": with_eval,
        "evaluations_per_run": evaluations,
        "ratio": median_ratio(with_eval, plain),
        "target": "<= 1.05",
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

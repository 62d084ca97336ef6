"""The plain loop of ``common.plain_loop`` run inside one bare Ray Train V2 worker: no Lightning, no
aigc driver, callbacks or logging. ``train_overhead.py`` times it beside ``aigc train`` and the same
loop in its own process, which splits aigc's step overhead into the stack's share and aigc's own.

Ray is started as ``bare_stack.py`` starts it (``common.start_embedded_ray``), each worker gets
``--threads`` CPUs, and rank 0 writes its JSON (``seconds_per_step``, ``samples_per_s`` per rank) to
``--out``. With ``--workers 2`` the ranks train with DDP over the gloo group Ray Train sets up:
``scaling.py``'s bare-stack side.

    .venv/bin/python benchmarks/ray_plain_loop.py --config models/diffusion.yaml --out /tmp/r.json \\
        --threads 2 --steps 220 --skip 40 --set data.location=/tmp/digits ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def loop(config: dict) -> None:
    import sys

    sys.path.insert(0, config["benchmarks"])  # the worker runs in Ray's session folder
    import ray.train

    from common import plain_loop

    result = plain_loop(
        Path(config["config"]),
        config["overrides"],
        config["threads"],
        config["steps"],
        config["skip"],
        ddp=config["workers"] > 1,  # TorchTrainer has set up the gloo process group
    )
    if ray.train.get_context().get_world_rank() == 0:
        Path(config["out"]).write_text(json.dumps(result))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workers", type=int, default=1, help="ranks; more than 1 trains with DDP")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--skip", type=int, default=20)
    p.add_argument("--storage", default="/tmp/aigc-ray-plain-loop")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="KEY=VALUE")
    a = p.parse_args()

    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from common import start_embedded_ray

    start_embedded_ray()
    config = {
        "benchmarks": str(HERE),
        "config": str(a.config.resolve()),
        "overrides": a.overrides,
        "threads": a.threads,
        "workers": a.workers,
        "steps": a.steps,
        "skip": a.skip,
        "out": a.out,
    }
    TorchTrainer(
        loop,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=a.workers, resources_per_worker={"CPU": a.threads}
        ),
        run_config=ray.train.RunConfig(storage_path=a.storage),
    ).fit()
    ray.shutdown()


if __name__ == "__main__":
    main()

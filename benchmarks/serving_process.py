"""Which process makes a served model call slower: the same `generate()` in five kinds of process.

`serving.py` finds the model call slower inside `aigc serve`'s replica than in a plain process. This
script takes the request path away and asks where the difference comes from. The export that
`serving.py` registers (``models/diffusion.yaml``, 8x8, DDIM 20 steps, 1 torch thread, one image
per call) is loaded into:

- ``in_process``: a plain Python process of its own session (`serving.py`'s in-process side);
- ``ray_actor``: a Ray actor, the model called on its main thread;
- ``serve_replica``: a bare Ray Serve replica (one deployment, no aigc code), called through a
  deployment handle;
- ``replica_child``: a plain process started by that replica, which relays each round to it;
- ``aigc_replica``: `aigc serve`'s own replica, timed by its ``/stats`` while requests arrive
  (``--ingress haproxy``).

Ray is started as `aigc serve` starts it (loopback, workers at normal priority, the replica's
environment). All sides are timed in alternating rounds of ``--round-calls`` calls (the order
rotated every round); each side's figure is the median over rounds of its mean call time divided
by the in-process one, with a distribution-free 95 % interval.

    .venv/bin/python benchmarks/serving_process.py [--rounds 24] [--round-calls 8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import warnings
from pathlib import Path
from typing import Any

from common import digits_dataset
from common import workdir as make_workdir
from serving import (
    NAME,
    Floor,
    median_ci95,
    registered_model,
    served_phase,
    start_server,
    stop_server,
    timed_calls,
)

HERE = Path(__file__).resolve().parent
SIDES = ("in_process", "ray_actor", "serve_replica", "replica_child", "aigc_replica")


class Holder:
    """The export, loaded and warmed as the in-process side loads it; ``child`` starts a plain
    process (``serving.py --floor-worker``) that this one relays rounds to."""

    def __init__(self, uri: str):
        import torch

        from aigc.registry.versions import client_for, load_version, resolve_version

        torch.set_num_threads(1)
        client = client_for(uri)
        self.module = load_version(client, resolve_version(client, f"{NAME}@production"))
        timed_calls(self.module, 1, 3)  # first calls allocate
        self.uri, self.child = uri, None

    def calls(self, n: int) -> tuple[list[float], list[float]]:
        return timed_calls(self.module, 1, n)

    def child_calls(self, n: int) -> tuple[list[float], list[float]]:
        if self.child is None:
            self.child = Floor(self.uri, 1, new_session=False)  # in the replica's session
        return self.child.calls(1, n)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rounds", type=int, default=24)
    p.add_argument("--round-calls", type=int, default=8, help="calls (or requests) per side per round")
    p.add_argument("--train-steps", type=int, default=30)
    args = p.parse_args()
    warnings.filterwarnings("ignore")

    work = make_workdir()
    uri = registered_model(work, digits_dataset(work), args.train_steps)
    server, port, _ = start_server(uri, work, ["--ingress", "haproxy"])  # its own embedded Ray
    floor = None
    try:
        served_phase(port, 1, 10, 30)  # warm-up
        floor = Floor(uri, 1)
        # A second Ray, in this process, as aigc serve starts its own (see aigc.serving.server)
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        os.environ["RAY_worker_niceness"] = "0"  # noqa: SIM112 (Ray spells it so)
        import ray
        from ray import serve

        from aigc.cluster import init_ray
        from aigc.serving.config import ServeConfig, replica_env

        init_ray(None)
        options = {
            "num_cpus": 0.5,
            "runtime_env": {"env_vars": {**replica_env(ServeConfig(ref="x")), "PYTHONPATH": str(HERE)}},
        }
        actor = ray.remote(Holder).options(**options).remote(uri)
        serve.start(proxy_location="Disabled")  # called through its handle only
        handle = serve.run(
            serve.deployment(Holder, ray_actor_options=options).bind(uri), name="bare", route_prefix=None
        )
        handle.child_calls.remote(1).result()  # starts the child

        def side(name: str, n: int) -> float:
            if name == "in_process":
                wall, _ = floor.calls(1, n)
            elif name == "ray_actor":
                wall, _ = ray.get(actor.calls.remote(n))
            elif name == "serve_replica":
                wall, _ = handle.calls.remote(n).result()
            elif name == "replica_child":
                wall, _ = handle.child_calls.remote(n).result()
            else:
                return served_phase(port, 1, n, 60)["model_ms_per_batch"] / 1000
            return statistics.mean(wall)

        rounds: list[dict[str, float]] = []
        for r in range(args.rounds):
            order = SIDES[r % len(SIDES) :] + SIDES[: r % len(SIDES)]
            rounds.append({name: side(name, args.round_calls) for name in (order if r % 2 else order[::-1])})
            print(
                f"round {r + 1}/{args.rounds}: "
                + ", ".join(f"{k} {1000 * v:.1f} ms" for k, v in rounds[-1].items()),
                file=sys.stderr,
            )
    finally:
        if floor is not None:
            floor.close()
        stop_server(server)
    out: dict[str, Any] = {
        "benchmark": "serving_process",
        "model": "models/diffusion.yaml, 8x8, DDIM 20 steps, 1 image per call, 1 torch thread",
        "rounds": args.rounds,
        "round_calls": args.round_calls,
        "in_process_ms": round(1000 * statistics.median(r["in_process"] for r in rounds), 1),
    }
    for name in SIDES[1:]:
        ratios = [r[name] / r["in_process"] for r in rounds]
        ci = median_ci95(ratios)
        out[f"{name}_vs_in_process"] = round(statistics.median(ratios), 3)
        out[f"{name}_ci95"] = [round(x, 3) for x in ci] if ci else None
    print(json.dumps(out))


if __name__ == "__main__":
    main()

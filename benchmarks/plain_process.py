"""The plain loop of ``common.plain_loop`` in a process of its own: no Ray, no Lightning, no aigc
driver. ``scaling.py`` starts two at once, either independent (what two 1-thread processes get from
this machine together) or as the two ranks of one DDP job over gloo on 127.0.0.1 (``--ddp``, with
``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` in the environment): the gradient
synchronisation's cost without Ray. Writes ``seconds_per_step`` and ``samples_per_s`` (this rank's)
to ``--out``.

    .venv/bin/python benchmarks/plain_process.py --config models/diffusion.yaml --out /tmp/p.json \\
        --threads 1 --steps 220 --skip 40 --set data.location=/tmp/digits ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import plain_loop


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--skip", type=int, default=20)
    p.add_argument("--ddp", action="store_true", help="one rank of a DDP job (env:// rendezvous)")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="KEY=VALUE")
    a = p.parse_args()
    if a.ddp:
        import torch.distributed as dist

        dist.init_process_group("gloo")  # RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT from the env
    result = plain_loop(a.config, a.overrides, a.threads, a.steps, a.skip, ddp=a.ddp)
    a.out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()

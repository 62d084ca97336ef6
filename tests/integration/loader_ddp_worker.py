"""One rank of the loader's DDP test: ``python loader_ddp_worker.py RANK WORLD PORT OUT CASE_JSON...``.

Each CASE_JSON is ``{"name", "location", "batch_size", "num_workers"}``. For every case the rank
runs one train epoch and one val pass, all-reducing a tensor after every batch (as DDP's gradient
sync does), so a rank with fewer batches than its peers would block until the test's timeout.
It then writes what it saw to ``OUT`` (JSON).
"""

from __future__ import annotations

import json
import sys
from datetime import timedelta


def main(argv: list[str]) -> None:
    rank, world, port, out = int(argv[0]), int(argv[1]), int(argv[2]), argv[3]
    cases = [json.loads(c) for c in argv[4:]]

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    from aigc.config import DataConfig
    from aigc.data.loader import ShardDataModule

    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=90),
    )
    result = {}
    for case in cases:
        cfg = DataConfig(
            batch_size=case["batch_size"],
            num_workers=case["num_workers"],
            shuffle_buffer=16,
            max_bad_fraction=0.0,
        )
        dm = ShardDataModule(cfg, case["location"], seed=1)
        seen = {"rank": dist.get_rank(), "world": dist.get_world_size()}
        for split, loader in (("train", dm.train_dataloader()), ("val", dm.val_dataloader())):
            keys, batches = [], 0
            for batch in loader:
                synced = torch.ones(1)
                dist.all_reduce(synced)  # blocks unless every rank is at a batch too
                assert synced.item() == world
                keys.extend(k for k, v in zip(batch["key"], batch["valid"].tolist(), strict=True) if v)
                batches += 1
            seen[split] = {"keys": keys, "batches": batches, "expected": dm.batches_per_epoch(split)}
        result[case["name"]] = seen
    dist.barrier()
    with open(out, "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])

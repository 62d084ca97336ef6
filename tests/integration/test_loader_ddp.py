"""Two real torch.distributed (gloo) processes read uneven shards: disjoint, covering, equal batches.

The ranks all-reduce after every batch, so unequal batch counts would hang them (and the timeout
would fail the test) rather than pass silently.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from loader_shards import all_keys, write_dataset

WORKER = Path(__file__).with_name("loader_ddp_worker.py")
WORLD = 2
CASES = {
    # An odd number of uneven shards, one DataLoader worker per rank.
    "uneven": {"sizes": {"train": [37, 10, 23, 5, 41], "val": [9, 4, 6]}, "batch_size": 8, "num_workers": 1},
    # Fewer shards (3) than ranks x workers (2 x 2): split by sample.
    "few_shards": {"sizes": {"train": [37, 10, 23], "val": [7]}, "batch_size": 4, "num_workers": 2},
}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> tuple[dict, dict]:
    """Run both cases in one two-rank job (one start-up); return (results per rank, manifests)."""
    root = tmp_path_factory.mktemp("ddp")
    manifests, args = {}, []
    for name, case in CASES.items():
        manifests[name] = write_dataset(root / name, case["sizes"])
        args.append(
            json.dumps(
                {
                    "name": name,
                    "location": str(root / name),
                    "batch_size": case["batch_size"],
                    "num_workers": case["num_workers"],
                }
            )
        )
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    # Each rank in its own process group, so a timeout can stop its DataLoader workers too.
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(r), str(WORLD), str(port), str(root / f"rank{r}.json"), *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for r in range(WORLD)
    ]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=100)[0])
    finally:
        for p in procs:  # only on timeout or error: stop the groups we started, by their id
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} failed:\n{outputs[r][-3000:]}"
    results = [json.loads((root / f"rank{r}.json").read_text()) for r in range(WORLD)]
    return results, manifests


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", list(CASES))
def test_ranks_are_disjoint_cover_the_split_and_yield_equal_batches(ddp_run, name: str) -> None:
    results, manifests = ddp_run
    case = CASES[name]
    per_rank = [r[name] for r in results]
    assert [r["rank"] for r in per_rank] == [0, 1] and all(r["world"] == WORLD for r in per_rank)
    for split in ("train", "val"):
        total = sum(case["sizes"][split])
        expected_batches = -(-total // (WORLD * case["batch_size"]))
        assert [r[split]["batches"] for r in per_rank] == [expected_batches] * WORLD
        assert all(r[split]["expected"] == expected_batches for r in per_rank)
        keys = [r[split]["keys"] for r in per_rank]
        assert all(len(k) == len(set(k)) for k in keys), "a real sample appeared twice on one rank"
        assert not set(keys[0]) & set(keys[1]), "ranks share samples"
        assert set(keys[0]) | set(keys[1]) == all_keys(manifests[name], split)
        assert all(keys), "a rank got no samples"

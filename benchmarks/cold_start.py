"""Seconds from the command to the first optimiser step: `aigc train` against the bare stack, in one run.

The floor is `bare_stack.py`: the smallest Ray Train V2 `TorchTrainer` + Lightning `RayDDPStrategy`
job (1 worker, a small conv net on tensors in memory, Ray started the way aigc starts it). Both are
started as fresh processes, alternately, `--repeat` times each; the figure is aigc's best total over
the floor's best total (target <= 1.05). aigc's own phases (imports, its preparation split by step:
config, manifest, data check, data version, git, starting the child that opens the MLflow run,
tokenizer, job file) are reported apart from the waits (for that child, and for Ray's start on its
thread) and from Ray's phases (worker start, first batch, first step), from the run's `startup/*`
metrics.

Two modes, in one run by default: `cold`, each job starting its own embedded Ray, and `warm`, each
job joining a Ray instance that is already running on 127.0.0.1 (`ray start --head`, started and
stopped here by process group, after one untimed aigc job has run on it): the case of many short
experiments in a row. `aigc_warm_over_cold` compares aigc's two.

    .venv/bin/python benchmarks/cold_start.py [--config CONFIG] [--repeat 2] [--modes cold warm]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, bench_overrides, digits_dataset, run_aigc_train
from common import workdir as make_workdir

TARGET = 1.05


def bare(work: Path, i: int, address: str | None, env: dict[str, str]) -> dict[str, float]:
    """One bare-stack job in a fresh process: its phases in seconds from the command."""
    out = work / f"bare-{i}.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bare_stack.py"), "--out", str(out)]
    cmd += ["--storage", str(work / "bare-runs")] + (["--address", address] if address else [])
    t0 = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.time() - t0
    if done.returncode != 0 or not out.exists():
        raise RuntimeError(f"bare-stack job failed:\n{done.stderr[-4000:]}")
    t = json.loads(out.read_text())
    return {
        "total_s": round(t["first_step_at"] - t0, 2),
        "imports_s": round(t["imported_at"] - t0, 2),
        "ray_start_s": round(t["ray_at"] - t["imported_at"], 2),
        "worker_start_s": round(t["worker_at"] - t["ray_at"], 2),
        "first_step_s": round(t["first_step_at"] - t["worker_at"], 2),
        "command_wall_s": round(wall, 2),
    }


def aigc(config: Path, work: Path, dataset: Path, i: int, address: str | None, env: dict[str, str]) -> dict:
    """One `aigc train` in a fresh process: its phases from the run's startup/* metrics."""
    from mlflow.tracking import MlflowClient

    overrides = bench_overrides(work, dataset, steps=3, workers=1, threads=1)
    if address:
        overrides.append(f"scaling.ray_address={address}")
    uri, run_id, wall = run_aigc_train(config, overrides, name=f"cold-{i}-{time.time_ns()}", env=env)
    m = MlflowClient(uri).get_run(run_id).data.metrics
    # Seconds since the train() call (launched_at): fit_call_s, worker_s, first_batch_s, first_step_s.
    return {
        "total_s": round(m["startup/imports_s"] + m["startup/first_step_s"], 2),
        "imports_s": round(m["startup/imports_s"], 2),
        "prepare_s": round(m["startup/prepare_s"], 2),
        "prepare_phases_s": {
            k.removeprefix("startup/prepare.").removesuffix("_s"): round(v, 3)
            for k, v in sorted(m.items())
            if k.startswith("startup/prepare.")
        },
        "ray_start_s": round(m["startup/ray_s"], 2),
        "ray_wait_s": round(m["startup/ray_wait_s"], 2),
        # Waiting for the child process that opens the MLflow run (aigc.tracking.opener).
        "tracking_wait_s": round(m.get("startup/tracking_wait_s", 0.0), 2),
        "fit_call_s": round(m["startup/fit_call_s"], 2),
        "worker_start_s": round(m["startup/worker_s"] - m["startup/fit_call_s"], 2),
        "first_batch_s": round(m["startup/first_batch_s"] - m["startup/worker_s"], 2),
        "first_step_s": round(m["startup/first_step_s"] - m["startup/first_batch_s"], 2),
        "command_wall_s": round(wall, 2),
    }


def start_head(work: Path) -> tuple[subprocess.Popen, str, dict[str, str]]:
    """`ray start --head --block` on 127.0.0.1 in its own process group; (process, address, env)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="token")
    ray = str(Path(sys.executable).parent / "ray")
    cmd = [ray, "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1"]
    cmd += ["--include-dashboard=false", "--disable-usage-stats"]
    with (work / "ray-head.log").open("w") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while subprocess.run([ray, "status", f"--address={address}"], env=env, capture_output=True).returncode:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"ray start failed:\n{(work / 'ray-head.log').read_text()[-3000:]}")
        time.sleep(1)
    return proc, address, env


def stop_head(proc: subprocess.Popen) -> None:
    # SIGTERM leaves some of Ray's processes behind (docs/stack-pitfalls.md): the whole group, SIGKILL.
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)


def measure(a: argparse.Namespace, work: Path, dataset: Path, warm: bool) -> dict:
    """Bare and aigc jobs, alternately, on an embedded Ray each or on one running head."""
    head, address, env = None, None, dict(os.environ)
    if warm:
        head, address, env = start_head(work)
    try:
        if warm:  # the cluster's first job pays for what a warm cluster keeps; not timed
            aigc(a.config, work, dataset, -1, address, env)
        bare_runs, aigc_runs = [], []
        for i in range(a.repeat):  # alternate, so background load hits both alike
            bare_runs.append(bare(work, i, address, env))
            aigc_runs.append(aigc(a.config, work, dataset, i, address, env))
    finally:
        if head is not None:
            stop_head(head)
    best_bare = min(r["total_s"] for r in bare_runs)
    best_aigc = min(r["total_s"] for r in aigc_runs)
    return {
        "ray": f"joined a running head at {address}" if warm else "embedded, started by each job",
        "bare_best_total_s": best_bare,
        "aigc_best_total_s": best_aigc,
        "ratio": round(best_aigc / best_bare, 3),
        "target_ratio": TARGET,
        "bare_runs": bare_runs,
        "aigc_runs": aigc_runs,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", type=Path, default=ROOT / "models" / "diffusion.yaml")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--modes", nargs="+", choices=["cold", "warm"], default=["cold", "warm"])
    a = p.parse_args()

    work = make_workdir()
    dataset = digits_dataset(work)
    results = {mode: measure(a, work, dataset, warm=mode == "warm") for mode in a.modes}
    out = {"benchmark": "cold_start", "config": str(a.config), "workers": 1, "threads_per_worker": 1}
    if len(results) == 2:
        out["aigc_warm_over_cold"] = round(
            results["warm"]["aigc_best_total_s"] / results["cold"]["aigc_best_total_s"], 3
        )
    print(json.dumps(out | results))


if __name__ == "__main__":
    main()

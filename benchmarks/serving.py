"""Latency and throughput of `aigc serve` against the in-process `generate()` floor.

A diffusion model from the shipped ``models/diffusion.yaml`` (8x8 digits; trained for a few steps:
timing does not depend on quality) is registered in a temporary MLflow store and served by the real
``aigc serve`` (embedded Ray on 127.0.0.1, one replica, its defaults: 0.5 CPU, 1 torch thread,
max batch 8). This process is the client: 1-sample requests (DDIM, 20 steps, no seed) over
keep-alive HTTP connections, at concurrency 1 and 8, each phase bounded in count and time. The
batch sizes the server formed in each phase come from its ``/stats``. The floor is a plain loop
over ``generate()`` in this process on the same export with the same thread count, one prompt per
call (the concurrency-1 floor) and eight (the best a batch of 8 can do).

Targets: p50 <= 100 ms at concurrency 1; requests/s at concurrency 8 >= 3x concurrency 1.

    .venv/bin/python benchmarks/serving.py [--requests 200] [--seconds 30] [--threads 1]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import threading
import time
import warnings
from pathlib import Path
from typing import Any

from common import AIGC, ROOT, digits_dataset
from common import workdir as make_workdir

NAME = "aigc-diffusion"
BODY = {"prompt": "a handwritten digit three", "num_samples": 1, "steps": 20, "sampler": "ddim"}


def registered_model(work: Path, dataset: Path, steps: int) -> str:
    """Train the shipped diffusion config for ``steps`` steps, register it, alias it production."""
    import pytorch_lightning as pl
    import torch

    from aigc.config import load_config
    from aigc.contract import CHECKPOINT_NAME, STEP_FILE, checkpoint_dir_name
    from aigc.data.captions_io import read_captions
    from aigc.data.loader import ShardDataModule
    from aigc.models import build_module
    from aigc.models.text import Tokenizer
    from aigc.registry.register import register_run
    from aigc.registry.versions import client_for
    from aigc.tracking import end_job_run, start_job_run
    from aigc.training.trainer import build_trainer

    uri = f"sqlite:///{work / 'mlflow.db'}"
    overrides = [f"trainer.max_steps={steps}", "data.num_workers=0", "trainer.warmup_steps=2"]
    cfg = load_config(ROOT / "models" / "diffusion.yaml", overrides)
    pl.seed_everything(0, verbose=False)
    module = build_module(cfg, Tokenizer.build(read_captions(dataset, "train")), 8, 1)
    trainer = build_trainer(module, limit_val_batches=0)
    torch.set_num_threads(1)  # not timed; 2 threads on a busy 2-core machine run several times slower
    trainer.fit(module, datamodule=ShardDataModule(cfg.data, location=dataset, seed=0))
    run_dir = work / "runs" / "bench"
    folder = run_dir / checkpoint_dir_name(steps)  # a complete checkpoint folder, as aigc train writes
    trainer.save_checkpoint(folder / CHECKPOINT_NAME)
    (folder / STEP_FILE).write_text(json.dumps({"global_step": steps}))
    tags = {"aigc.family": "diffusion", "aigc.storage": str(run_dir), "aigc.run.name": "bench"}
    run_id = start_job_run(uri, "benchmarks", "bench", tags=tags)
    end_job_run(uri, run_id)
    version = register_run(run_id, uri).version
    client_for(uri).set_registered_model_alias(NAME, "production", version)
    return uri


def summary(latencies: list[float], wall: float) -> dict[str, Any]:
    ms = sorted(x * 1000 for x in latencies)
    return {
        "requests": len(ms),
        "p50_ms": round(statistics.median(ms), 1),
        "p95_ms": round(ms[min(len(ms) - 1, int(0.95 * len(ms)))], 1),
        "requests_per_s": round(len(ms) / wall, 2),
    }


def load_phase(port: int, concurrency: int, max_requests: int, max_seconds: float) -> dict[str, Any]:
    """``concurrency`` client threads, each on its own keep-alive connection, until ``max_requests``
    answers or ``max_seconds``; every answer must be a 200 with one image."""
    body = json.dumps(BODY).encode()
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + max_seconds

    def worker() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while time.monotonic() < deadline:
            with lock:
                if len(latencies) + len(errors) >= max_requests:
                    break
            t0 = time.perf_counter()
            conn.request("POST", "/generate", body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            payload = resp.read()
            dt = time.perf_counter() - t0
            with lock:
                if resp.status == 200 and len(json.loads(payload)["images"]) == 1:
                    latencies.append(dt)
                else:
                    errors.append(f"{resp.status} {payload[:200]!r}")
        conn.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {
        "concurrency": concurrency,
        **summary(latencies, wall),
        "errors": len(errors),
        "error_sample": errors[:3],
    }


def get_json(port: int, path: str) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", path)
    out = json.loads(conn.getresponse().read())
    conn.close()
    return out


def batch_sizes_between(before: dict, after: dict) -> dict[str, int]:
    sizes = {
        k: after["batch_sizes"].get(k, 0) - before["batch_sizes"].get(k, 0) for k in after["batch_sizes"]
    }
    return {k: v for k, v in sorted(sizes.items(), key=lambda kv: int(kv[0])) if v}


def served(uri: str, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Start ``aigc serve``, run both load phases, stop it by process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log_path = work / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [AIGC, "serve", f"{NAME}@production", "--tracking-uri", uri, "--port", str(port)]
    cmd += ["--threads-per-replica", str(args.threads), "--batch-wait", str(args.batch_wait)]
    t0 = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        while "stop with Ctrl-C" not in log_path.read_text():
            if proc.poll() is not None or time.perf_counter() - t0 > 180:
                raise RuntimeError(f"aigc serve did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.25)
        ready_s = time.perf_counter() - t0
        load_phase(port, 1, 10, 10)  # warm-up: first calls allocate
        phases = []
        for concurrency in (1, 8):
            before = get_json(port, "/stats")
            phase = load_phase(port, concurrency, args.requests, args.seconds)
            after = get_json(port, "/stats")
            phase["batch_sizes"] = batch_sizes_between(before, after)
            batches = after["batches"] - before["batches"]
            model_s = after["model_seconds"] - before["model_seconds"]
            phase["model_ms_per_batch"] = round(1000 * model_s / batches, 1) if batches else None
            phases.append(phase)
        return {"command_to_ready_s": round(ready_s, 1), "phases": phases}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def floor(uri: str, args: argparse.Namespace) -> dict[str, Any]:
    """The same export in this process: ``generate()`` of one prompt, then of eight, in a loop."""
    import torch

    from aigc.registry.versions import client_for, load_version, resolve_version

    torch.set_num_threads(args.threads)
    client = client_for(uri)
    module = load_version(client, resolve_version(client, f"{NAME}@production"))
    options = {k: BODY[k] for k in ("steps", "sampler")}
    out = {}
    for batch in (1, 8):
        for _ in range(3):
            module.generate([BODY["prompt"]] * batch, **options)
        latencies, t0 = [], time.perf_counter()
        while len(latencies) < args.requests // batch and time.perf_counter() - t0 < args.seconds:
            t1 = time.perf_counter()
            module.generate([BODY["prompt"]] * batch, **options)
            latencies.append(time.perf_counter() - t1)
        wall = time.perf_counter() - t0
        s = summary(latencies, wall)
        out[f"batch_{batch}"] = {
            "calls": s["requests"],
            "p50_ms_per_call": s["p50_ms"],
            "p95_ms_per_call": s["p95_ms"],
            "images_per_s": round(batch * s["requests_per_s"], 2),
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--requests", type=int, default=200, help="most requests per phase")
    p.add_argument("--seconds", type=float, default=30.0, help="most seconds per phase")
    p.add_argument("--threads", type=int, default=1, help="torch threads (replica and floor)")
    p.add_argument("--batch-wait", type=float, default=0.01, help="aigc serve --batch-wait")
    p.add_argument("--train-steps", type=int, default=30)
    args = p.parse_args()
    warnings.filterwarnings("ignore")

    load_before = os.getloadavg()[0]  # other work on the machine skews every figure: record it
    work = make_workdir()
    uri = registered_model(work, digits_dataset(work), args.train_steps)
    plain = floor(uri, args)  # first, on a quiet machine: no Ray processes yet
    server = served(uri, work, args)
    c1, c8 = server["phases"]
    speedup = c8["requests_per_s"] / c1["requests_per_s"] if c1["requests_per_s"] else None
    print(
        json.dumps(
            {
                "benchmark": "serving",
                "model": "models/diffusion.yaml, 8x8, DDIM 20 steps, guidance 2.0 (the config's)",
                "request": BODY,
                "server": f"aigc serve: 1 replica, 0.5 CPU, max batch 8, --batch-wait {args.batch_wait}",
                "threads": args.threads,
                "cpus": os.cpu_count(),
                "loadavg_1m_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
                "targets": {"p50_ms_concurrency_1": 100.0, "speedup_8_over_1": 3.0},
                "p50_ms_concurrency_1": c1["p50_ms"],
                "speedup_8_over_1": round(speedup, 2) if speedup else None,
                "served": server,
                "in_process_floor": plain,
            }
        )
    )


if __name__ == "__main__":
    main()

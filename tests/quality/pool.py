"""Run the quality runs as one-thread processes, two at a time.

Every quality run trains on one torch thread: the small nets gain little from a second OpenMP
thread, and on 2 busy cores OpenMP's spin-waiting made a 50-CPU-second run take over 600 s here (the
shipped YAMLs say the same: ``trainer.threads_per_worker: 1``). So a test that ran them one after
another left a core of a 2-core machine idle. The runs are independent and their figures do not
depend on what else runs (CPU training is deterministic for a seed), so the session runs them as
separate processes, :data:`PARALLEL` at a time, longest first (a job that needs another, such as a
reference evaluator, once that one is done), and each test asserts on its run's JSON (``--out``).
A run that fails or times out gives ``{"error": <its output's tail>}`` to its test, and the other
runs go on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
PARALLEL = 2  # one run per core
RUN_TIMEOUT = 1200.0  # seconds per run; each takes 1-3 min alone on an idle core


@dataclass(frozen=True)
class Job:
    """One quality run: ``python tests/quality/<argv[0]> <argv[1:]> --out <file>``.

    ``seconds`` is about what it takes alone on an idle core, for the longest-first order."""

    key: str
    argv: tuple[str, ...]
    seconds: float
    after: str | None = None  # the key of a job that must have succeeded first (an evaluator)


def run_jobs(jobs: list[Job], workdir: Path, parallel: int = PARALLEL) -> dict[str, dict]:
    """Each job's JSON result (or ``{"error": ...}``), by key; logs and results go to ``workdir``."""
    workdir.mkdir(parents=True, exist_ok=True)
    pending = sorted(jobs, key=lambda j: -j.seconds)
    # One thread per run, for every library that would start its own pool.
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    running: dict[str, tuple[subprocess.Popen, float, Path, Path]] = {}
    results: dict[str, dict] = {}
    while pending or running:
        for job in [j for j in pending if j.after is not None and "error" in results.get(j.after, {})]:
            pending.remove(job)  # what it needed failed: so does it, saying why
            results[job.key] = {"error": f"{job.after} failed: {results[job.after]['error']}"}
        ready = [j for j in pending if j.after is None or j.after in results]
        while ready and len(running) < parallel:
            job = ready.pop(0)
            pending.remove(job)
            stem = job.key.replace("/", "-")
            out, log = workdir / f"{stem}.json", workdir / f"{stem}.log"
            cmd = [sys.executable, str(HERE / job.argv[0]), *job.argv[1:], "--out", str(out)]
            with log.open("w") as f:
                proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=workdir)
            running[job.key] = (proc, time.monotonic(), out, log)
        time.sleep(0.5)
        for key, (proc, started, out, log) in list(running.items()):
            if proc.poll() is None and time.monotonic() - started < RUN_TIMEOUT:
                continue
            if proc.poll() is None:  # over its time: stop this process (ours, by pid)
                proc.kill()
                proc.wait()
            del running[key]
            if proc.returncode == 0 and out.is_file():
                results[key] = json.loads(out.read_text())
                results[key]["wall_seconds"] = round(time.monotonic() - started, 1)
            else:
                tail = log.read_text(errors="replace")[-4000:]
                results[key] = {"error": f"{key} ended with {proc.returncode} ({log}):\n{tail}"}
            print(f"quality run {key}: {json.dumps(results[key])}", flush=True)
    return results

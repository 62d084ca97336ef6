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

The pool starts with the session (:class:`BackgroundPool`, from ``tests/conftest.py``): a scheduler
process runs the jobs at the idle CPU priority (``SCHED_IDLE``) while the rest of the suite runs, on
the CPU time the other tests leave idle (they mostly wait on servers, Ray start-ups and subprocesses:
about half a core of two on average), and the quality tests run last and wait for its results (the
runs are back at the normal priority then). A run's figures do not depend on when it gets the CPU,
and the other tests keep the CPU whenever they want it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
PARALLEL = 2  # one run per core
RUN_TIMEOUT = 1200.0  # CPU seconds per run; each takes 1-3 min alone on an idle core
# Wall seconds per run: in the background a run waits while the other tests use both cores, so its
# limit is its CPU time (RUN_TIMEOUT); this one catches a run that hangs without using any.
RUN_WALL_TIMEOUT = 3600.0


@dataclass(frozen=True)
class Job:
    """One quality run: ``python tests/quality/<argv[0]> <argv[1:]> --out <file>``.

    ``seconds`` is about what it takes alone on an idle core, for the longest-first order."""

    key: str
    argv: tuple[str, ...]
    seconds: float
    after: str | None = None  # the key of a job that must have succeeded first (an evaluator)


# Every quality run, by key: its runner's arguments and about how many seconds it takes alone on an
# idle core (for the longest-first order). A test asks for its runs with
# ``@pytest.mark.quality_runs(key, ...)`` and reads them from ``quality_runs``; the digits runs wait for
# the ``digits/evaluator`` job, the emoji runs for the ``emoji/evaluator`` job.
DIGITS_RUNS = {
    "digits/diffusion": (("diffusion", "--validate"), 130),
    "digits/autoregressive": (("autoregressive", "--validate"), 115),
    "digits/gan": (("gan",), 75),
    "digits/vae": (("vae", "--validate"), 75),
}
# In the pool every digits run reads its shards in its own process: a DataLoader worker process per run
# would be a third and fourth process on 2 cores, and its batches are the same (seed 0 GAN: identical
# figures with data.num_workers 0 and 1).
DIGITS_COMMON = ("--set", "data.num_workers=0")
EMOJI_SECONDS = {
    "gan": 330,
    "latent-autoregressive": 270,
    "diffusion": 190,
    "vae": 150,
    "latent-diffusion": 140,
}


def plan_jobs(keys: set[str], digits: Path | None, emoji: Path | None, work: Path) -> list[Job]:
    """The jobs of the runs ``keys`` (``digits/...`` on the ``digits`` shards, ``emoji/...`` on the
    ``emoji`` dataset, their files under ``work``), and of the reference evaluators they load.

    Each evaluator trains as a one-thread job into the session's cache (``AIGC_EVALUATOR_CACHE``,
    tests/conftest.py; the digits one is the evaluator the integration tests share: whichever trains
    it first saves it, the other loads it), and the runs wait for it and load it from there."""
    from emoji_run import RECIPES

    unknown = keys - set(DIGITS_RUNS) - {f"emoji/{n}" for n in RECIPES}
    assert not unknown, f"no quality run named {sorted(unknown)}"
    jobs = []
    if any(k.startswith("digits/") for k in keys):
        assert digits is not None
        jobs.append(Job("digits/evaluator", ("emoji_run.py", "evaluator", "--dataset", str(digits)), 999))
        for key in sorted(k for k in keys if k.startswith("digits/")):
            argv, seconds = DIGITS_RUNS[key]
            argv = ("quality_run.py", argv[0], "--dataset", str(digits), *argv[1:], *DIGITS_COMMON)
            jobs.append(Job(key, argv, seconds, after="digits/evaluator"))
    if any(k.startswith("emoji/") for k in keys):
        assert emoji is not None
        jobs.append(Job("emoji/evaluator", ("emoji_run.py", "evaluator", "--dataset", str(emoji)), 999))
        for key in sorted(k for k in keys if k.startswith("emoji/")):
            name = key.removeprefix("emoji/")
            argv = ("emoji_run.py", name, "--dataset", str(emoji), "--workdir", str(work / name))
            jobs.append(Job(key, argv, EMOJI_SECONDS[name], after="emoji/evaluator"))
    return jobs


def run_jobs(
    jobs: list[Job],
    workdir: Path,
    parallel: int = PARALLEL,
    orphaned: Callable[[], bool] = lambda: False,
    idle: Callable[[], bool] = lambda: False,
) -> dict[str, dict]:
    """Each job's JSON result (or ``{"error": ...}``), by key; logs and results go to ``workdir``.

    While ``idle()`` is true, runs start at the idle CPU priority (``SCHED_IDLE``); once it turns
    false, later runs start at the normal one and those running are lifted to it (where the system
    lets a process leave ``SCHED_IDLE``: root, or a raised ``RLIMIT_NICE``). The runs still going
    when it ends otherwise (an exception, SIGTERM's ``SystemExit``, or ``orphaned()`` turning true)
    are ended with it."""
    workdir.mkdir(parents=True, exist_ok=True)
    pending = sorted(jobs, key=lambda j: -j.seconds)
    # One thread per run, for every library that would start its own pool.
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    running: dict[str, tuple[subprocess.Popen, float, Path, Path]] = {}
    results: dict[str, dict] = {}
    lowered: set[int] = set()  # pids of the runs started at the idle priority
    try:
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
                low = idle()
                with log.open("w") as f:
                    proc = subprocess.Popen(
                        cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=workdir,
                        preexec_fn=_idle_priority if low else None,
                    )  # fmt: skip
                running[job.key] = (proc, time.monotonic(), out, log)
                if low:
                    lowered.add(proc.pid)
            time.sleep(0.5)
            if orphaned():  # whoever wanted the results is gone
                sys.exit(1)
            if lowered and not idle():
                for proc, *_ in running.values():
                    if proc.pid in lowered:
                        with contextlib.suppress(OSError):  # not allowed here, or it ended
                            os.sched_setscheduler(proc.pid, os.SCHED_OTHER, os.sched_param(0))
                lowered.clear()
            for key, (proc, started, out, log) in list(running.items()):
                if proc.poll() is None and not _over_time(proc, started):
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
    finally:  # runs still going when this ends otherwise: ours, by pid
        for proc, *_ in running.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def _idle_priority() -> None:
    """In a run's process before it starts: the idle CPU priority (the CPU no one else wants)."""
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


def _over_time(proc: subprocess.Popen, started: float) -> bool:
    """Whether a running job is past :data:`RUN_TIMEOUT` CPU seconds or :data:`RUN_WALL_TIMEOUT`."""
    if time.monotonic() - started > RUN_WALL_TIMEOUT:
        return True
    try:
        with open(f"/proc/{proc.pid}/stat") as f:  # utime and stime, fields 14 and 15, in ticks
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK") > RUN_TIMEOUT
    except (OSError, IndexError, ValueError):  # it ended meanwhile
        return False


class BackgroundPool:
    """:func:`run_jobs` in a scheduler process (``python pool.py``), started now, its runs at the idle
    CPU priority until :meth:`results` waits for them. Started before any other fixture starts a
    process, so it is never one of the processes a fixture such as ``embedded_ray`` takes for its own."""

    def __init__(self, jobs: list[Job], workdir: Path):
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir, self.out = workdir, workdir / "results.json"
        plan = workdir / "plan.json"
        plan.write_text(json.dumps([asdict(j) for j in jobs]))
        cmd = [sys.executable, str(HERE / "pool.py"), str(plan), str(workdir), "--out", str(self.out)]
        self.log = (workdir / "pool.log").open("w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=workdir)

    def results(self) -> dict[str, dict]:
        """Each job's result (:func:`run_jobs`), once every job has ended. Waiting, pytest leaves the
        CPU to the runs: from now on they run at the normal priority (the scheduler sees ``waiting``)."""
        (self.workdir / "waiting").touch()
        self.proc.wait()
        self.log.flush()
        print((self.workdir / "pool.log").read_text(errors="replace"), flush=True)
        assert self.proc.returncode == 0 and self.out.is_file(), (
            f"the quality pool ended with {self.proc.returncode}: see {self.workdir / 'pool.log'}"
        )
        return json.loads(self.out.read_text())

    def stop(self) -> None:
        """End the scheduler and its runs (it ends its runs on SIGTERM), if still running."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def _scheduler(plan: Path, workdir: Path, out: Path) -> None:
    """The scheduler process of :class:`BackgroundPool`: :func:`run_jobs`, the runs at the idle CPU
    priority until ``workdir/waiting`` exists (:meth:`BackgroundPool.results`: pytest waits for them
    now). It ends its runs and itself on SIGTERM, and when the pytest process that started it is gone."""
    parent = os.getppid()
    waiting = workdir / "waiting"
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # run_jobs ends its runs on the way out
    jobs = [Job(**{**j, "argv": tuple(j["argv"])}) for j in json.loads(plan.read_text())]
    results = run_jobs(
        jobs, workdir, orphaned=lambda: os.getppid() != parent, idle=lambda: not waiting.exists()
    )
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(results))
    tmp.rename(out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Run a plan of quality jobs (BackgroundPool).")
    parser.add_argument("plan", type=Path)
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    _scheduler(args.plan, args.workdir, args.out)

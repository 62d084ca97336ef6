"""``aigc sweep`` on the embedded Ray with a real MLflow sqlite store: a 4-trial ASHA sweep, 2 at a
time, on a scripted-bad learning rate, killed mid-way and resumed.

One sweep serves every assertion, to keep the file's wall time near three minutes on 2 cores: the
command runs in its own process group, is killed (SIGKILL to the group, as a crash would) once two
trials have ended, then ``aigc sweep --resume`` finishes it and registers the best trial.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from tiny import TINY

AIGC = str(Path(sys.executable).parent / "aigc")
ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow

GOOD_LR, BAD_LR = 0.002, 50.0  # 50: the loss is NaN from the first steps (the run logs none)


def _sets(tmp: Path, dataset: Path) -> list[str]:
    overrides = [
        *TINY["diffusion"],
        f"data.location={dataset}",
        "data.batch_size=32",
        "data.num_workers=0",
        "trainer.max_steps=20",
        "trainer.warmup_steps=2",
        "trainer.log_every_steps=5",
        "trainer.val_every_steps=5",
        "trainer.limit_val_batches=2",
        "trainer.checkpoint_every_steps=5",
        "trainer.sample_every_steps=100",
        f"scaling.storage_path={tmp / 'runs'}",
        f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}",
        "tracking.experiment=sweeps",
        "tracking.system_metrics=false",
    ]
    return [f"--set={o}" for o in overrides]


def _env() -> dict[str, str]:
    env = {**os.environ}
    # An earlier in-process embedded Ray leaves these set in the pytest process (see test_train).
    for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        env.pop(key, None)
    return env


class _Lines:
    """A process's stdout, read on a thread, kept line by line."""

    def __init__(self, proc: subprocess.Popen):
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def count(self, *words: str) -> int:
        return sum(any(w in line for w in words) for line in self.lines)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the sweep's process group and every process it started (Ray's own may have left the
    group): only processes this test started, by id."""
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    for p in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    proc.wait(timeout=30)
    psutil.wait_procs(family, timeout=30)


@pytest.mark.timeout(600)
def test_asha_sweep_killed_midway_resumes_into_the_same_runs(digits_dataset, tmp_path):
    name = "lr"
    cmd = [
        AIGC,
        "sweep",
        str(ROOT / "models" / "diffusion.yaml"),
        f"--param=trainer.lr=grid:{GOOD_LR},{BAD_LR}",
        "--param=model.base_channels=choice:8,16",
        "--trials=2",  # x 2 grid points: t000 good, t001 bad, t002 good, t003 bad
        "--concurrent=2",
        "--workers=1",
        "--scheduler=asha",
        "--grace-period=5",
        f"--name={name}",
        *_sets(tmp_path, digits_dataset),
    ]
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_env(),
        cwd=tmp_path,
        start_new_session=True,
    )
    out = _Lines(proc)
    try:
        # Killed once two trials have ended (finished or stopped): the others are cut off mid-way.
        while out.count("] finished:", "] stopped by") < 2:
            assert proc.poll() is None, "\n".join(out.lines[-60:])
            assert time.monotonic() - t0 < 400, "\n".join(out.lines[-60:])
            time.sleep(0.5)
    finally:
        _kill_group(proc)
    killed_at = time.monotonic() - t0
    # Two trials opened their runs at once without failing (the sweep logs their dataset first).
    assert out.count("] failed") == 0, "\n".join(out.lines)
    assert out.count("] started: trainer.lr=") >= 2
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("sweeps").experiment_id
    parents = client.search_runs([experiment], f"tags.`aigc.sweep.name` = '{name}'")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "RUNNING"  # the driver died with it
    assert parent.data.params["space.trainer.lr"] == f"grid:{GOOD_LR},{BAD_LR}"
    assert parent.data.params["sweep.scheduler"] == "asha"
    assert parent.data.params["sweep.metric"] == "val/loss" and parent.data.params["sweep.mode"] == "min"
    assert parent.data.params["sweep.trials"] == "2" and parent.data.params["sweep.concurrent"] == "2"

    resumed = subprocess.run(
        [
            AIGC,
            "sweep",
            "--resume",
            name,
            "--register-best",
            f"--set=scaling.storage_path={tmp_path / 'runs'}",
        ],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=tmp_path,
        timeout=420,
    )
    assert resumed.returncode == 0, resumed.stdout[-4000:] + resumed.stderr[-4000:]
    text = resumed.stdout
    print(f"killed after {killed_at:.0f} s; resumed in {time.monotonic() - t0 - killed_at:.0f} s")
    print("\n".join(out.lines) + "\n--- resumed ---\n" + text)

    # One parent run, FINISHED; exactly 4 child runs nested under it (no duplicate on the resume).
    parents = client.search_runs([experiment], f"tags.`aigc.sweep.name` = '{name}'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    by_name = {r.data.tags["aigc.run.name"]: r for r in children}
    assert sorted(by_name) == [f"{name}-t000", f"{name}-t001", f"{name}-t002", f"{name}-t003"]
    assert all(r.info.run_name == n for n, r in by_name.items())  # the UI shows the trial's name
    assert not [r for r in children if r.info.status == "RUNNING"]
    # ASHA stopped at least one trial, each on the bad learning rate; a stopped run is KILLED and
    # says so; the good ones finished.
    stopped = [r for r in children if r.data.tags.get("aigc.sweep.stopped") == "asha"]
    assert stopped, {n: (r.info.status, r.data.tags.get("aigc.sweep.stopped")) for n, r in by_name.items()}
    for r in stopped:
        assert r.info.status == "KILLED"
        assert float(r.data.params["trainer.lr"]) == BAD_LR
    # The good trials finished. (A bad one that reaches each rung before any other trial has a value
    # there is not stopped: ASHA is asynchronous; t003 starts after t000 has finished, so ASHA has
    # t000's values at every rung by then and stops it at its first.)
    good = [r for r in children if float(r.data.params["trainer.lr"]) == GOOD_LR]
    assert len(good) == 2 and all(r.info.status == "FINISHED" for r in good)
    assert by_name[f"{name}-t003"].info.run_id in {r.info.run_id for r in stopped}
    finished = [r for r in children if r.info.status == "FINISHED" and "val/loss" in r.data.metrics]
    # A diverged run logs no val/loss: the finished runs with a value are the good ones.
    assert {r.info.run_id for r in finished} == {r.info.run_id for r in good}
    # The parent's best trial is the finished child with the lowest val/loss (the first by name
    # where two have it).
    low = min(r.data.metrics["val/loss"] for r in finished)
    best = min((r for r in finished if r.data.metrics["val/loss"] == low), key=lambda r: r.info.run_name)
    assert parent.data.tags["aigc.sweep.best_run_id"] == best.info.run_id
    assert parent.data.tags["aigc.sweep.best_trial"] == best.data.tags["aigc.run.name"]
    assert parent.data.metrics["best/val/loss"] == pytest.approx(best.data.metrics["val/loss"])
    assert f"best: {best.data.tags['aigc.run.name']} ({best.info.run_id})" in text
    # The end table names every trial with its params, value and status.
    for n, r in by_name.items():
        row = next(line for line in text.splitlines() if line.startswith(n + " "))
        assert ("STOPPED" if r.data.tags.get("aigc.sweep.stopped") else r.info.status) in row
    # No metric has two values at one step, in any trial, the continued ones included. (startup/*
    # are per launch, logged at step 0 by each: aigc.training.launcher._log_startup.)
    for n, r in by_name.items():
        for key in r.data.metrics:
            if key.startswith("startup/"):
                continue
            steps = [m.step for m in client.get_metric_history(r.info.run_id, key)]
            assert len(steps) == len(set(steps)), (n, key, sorted(steps))
    assert sorted(m.step for m in client.get_metric_history(best.info.run_id, "val/loss")) == [5, 10, 15, 20]
    # --register-best: the best trial's run is a candidate version, not promoted.
    version = client.get_model_version_by_alias("aigc-diffusion", "candidate")
    assert version.run_id == best.info.run_id
    assert parent.data.tags["aigc.sweep.registered"] == f"aigc-diffusion/{version.version}"
    with pytest.raises(Exception, match="production"):
        client.get_model_version_by_alias("aigc-diffusion", "production")

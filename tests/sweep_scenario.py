"""One real ``aigc sweep``, killed mid-way and resumed: the scenario that tests/integration/test_sweep.py
asserts on and whose MLflow store tests/e2e/test_sweep_compare.py opens in the browser.

The session fixture ``asha_sweep`` (tests/conftest.py) runs it once per pytest session, for whichever
of the two tests needs it first. A 4-trial ASHA sweep on the embedded Ray, 2 at a time, over a
scripted-bad learning rate (``trainer.lr`` grid ``GOOD_LR, BAD_LR`` x ``model.base_channels`` choice
8, 16) into a sqlite MLflow store: the command runs in its own process group, is killed (SIGKILL to
the group, as a crash would) once two trials have ended, then ``aigc sweep --resume --register-best``
finishes it. A failure of any step fails the fixture (so each test using it) with the output's tail.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from tiny import TINY

AIGC = str(Path(sys.executable).parent / "aigc")
ROOT = Path(__file__).resolve().parents[1]

GOOD_LR, BAD_LR = 0.002, 50.0  # 50: the loss is NaN from the first steps (the run logs none)
NAME = "lr"  # the sweep's name (--name)
EXPERIMENT = "sweeps"


@dataclass(frozen=True)
class SweepScenario:
    """What the scenario left: read it, never write to its folder or store (it is shared)."""

    tmp: Path  # the commands' working folder: runs/ (Ray's storage) and mlflow.db
    uri: str  # the sqlite tracking URI
    experiment: str  # the sweeps experiment's id
    name: str  # the sweep's name
    good_lr: float
    bad_lr: float
    command: list[str]  # the first `aigc sweep` command
    lines: list[str]  # what it printed (stdout and stderr) before it was killed
    killed_at: float  # seconds from its start to the kill
    runs_at_kill: list  # the store's parent runs of the sweep, read right after the kill (mlflow Run)
    resumed: subprocess.CompletedProcess  # `aigc sweep --resume NAME --register-best`
    resumed_seconds: float


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
        f"tracking.experiment={EXPERIMENT}",
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
    group): only processes this scenario started, by id."""
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


def run_asha_sweep(tmp: Path, dataset: Path) -> SweepScenario:
    """Run the scenario in ``tmp`` on the digits shards at ``dataset``; assert each step worked."""
    from mlflow.tracking import MlflowClient

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
        f"--name={NAME}",
        *_sets(tmp, dataset),
    ]
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_env(),
        cwd=tmp,
        start_new_session=True,
    )
    out = _Lines(proc)
    try:
        # Killed once two trials have ended (finished or stopped): the others are cut off mid-way.
        while out.count("] finished:", "] stopped by") < 2:
            assert proc.poll() is None, "aigc sweep exited before the kill:\n" + "\n".join(out.lines[-60:])
            assert time.monotonic() - t0 < 400, "no two trials ended in 400 s:\n" + "\n".join(out.lines[-60:])
            time.sleep(0.5)
    finally:
        _kill_group(proc)
    killed_at = time.monotonic() - t0
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(EXPERIMENT)
    assert found is not None, "no sweeps experiment after the kill:\n" + "\n".join(out.lines[-60:])
    experiment = found.experiment_id
    runs_at_kill = client.search_runs([experiment], f"tags.`aigc.sweep.name` = '{NAME}'")

    start = time.monotonic()
    resumed = subprocess.run(
        [AIGC, "sweep", "--resume", NAME, "--register-best", f"--set=scaling.storage_path={tmp / 'runs'}"],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=tmp,
        timeout=420,
    )
    assert resumed.returncode == 0, (
        "aigc sweep --resume failed:\n" + resumed.stdout[-4000:] + resumed.stderr[-4000:]
    )
    return SweepScenario(
        tmp=tmp,
        uri=uri,
        experiment=experiment,
        name=NAME,
        good_lr=GOOD_LR,
        bad_lr=BAD_LR,
        command=cmd,
        lines=list(out.lines),
        killed_at=killed_at,
        runs_at_kill=runs_at_kill,
        resumed=resumed,
        resumed_seconds=time.monotonic() - start,
    )

"""The MLflow server goes away in the middle of a training run and comes back: nothing is lost.

Two hosts on a bridge (:mod:`netns`): a real ``mlflow server`` (sqlite store) on host 0, and
``aigc train`` (with its embedded Ray) on host 1, logging to the server over HTTP at host 0's
address; nothing between them crosses loopback. Once the run has logged its first ``train/loss``
the server's process group is killed (SIGKILL, what this test started and nothing else), kept down
for :data:`DOWN_S` seconds and started again on the same address and store; training ends in
between. The run must end
FINISHED with every ``train/loss`` step of its fixed schedule (every ``log_every_steps`` up to
``max_steps``) in the store: the worker's :class:`aigc.tracking.RunLogger` holds what it could not
send and sends it, in order, once the server answers again.

The job runs with ``MLFLOW_HTTP_REQUEST_MAX_RETRIES=0`` (the driver hands it to the workers), so
that it is aigc's own retrying that carries the outage, not MLflow's client: with MLflow's default
(7 retries, back-off up to 2 minutes) the batch in flight waits inside the client and arrives too,
but with retries off, before RunLogger retried, 49 of the 60 steps were lost (measured).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from netns import Hosts, hosts, unavailable
from ray_cluster import BIN
from test_train import tiny_overrides

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
if reason := unavailable():
    pytest.skip(reason, allow_module_level=True)

PORT = 5000  # each host has its own network: no other process can hold it there
DOWN_S = 6.0  # how long the server stays dead
# ~16 ms a step here: training ends while the server is still down, so the job's last logs (the
# final flush and the synchronous upload of the final grid) wait for it too.
STEPS, LOG_EVERY = 300, 25


def api(base: str, path: str, body: dict | None = None, timeout: float = 3) -> dict:
    """One request to the server's REST API, no retries (unlike MlflowClient's minutes of them)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"{base}/api/2.0/mlflow/{path}", data=data, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def loss_steps(base: str, run_id: str) -> list[int]:
    """The steps of the run's train/loss history in the store; [] while the server is down."""
    try:
        history = api(base, f"metrics/get-history?run_id={run_id}&metric_key=train/loss")
    except (OSError, ValueError):
        return []
    return sorted(int(m.get("step", 0)) for m in history.get("metrics", []))


def start_server(net: Hosts, store: Path, log: Path):
    """``mlflow server`` on host 0 at its bridge address, in its own process group; waits until it
    answers (from this process, across the bridge)."""
    proc = net.popen(
        0,
        [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
         "--artifacts-destination", str(store / "artifacts"), "--host", net.addresses[0],
         "--port", str(PORT), "--workers", "1"],
        stdout=log.open("a"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    base = f"http://{net.addresses[0]}:{PORT}"
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2):
                return proc
        except OSError:
            assert proc.poll() is None, f"mlflow server exited:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"mlflow server silent for 90 s:\n{log.read_text()[-3000:]}"
            time.sleep(0.3)


@pytest.mark.timeout(300)
def test_metrics_survive_a_tracking_server_outage(tmp_path, digits_dataset):
    store = tmp_path / "store"
    store.mkdir()
    server_log = tmp_path / "mlflow-server.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    for key in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        env.pop(key, None)
    env["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"  # a failed request fails at once: RunLogger retries
    with hosts(2) as net:
        print("hosts", net.names)
        server = start_server(net, store, server_log)
        base = f"http://{net.addresses[0]}:{PORT}"
        overrides = tiny_overrides("vae", tmp_path, digits_dataset, steps=STEPS, workers=1)
        overrides += [
            f"trainer.log_every_steps={LOG_EVERY}",
            "trainer.val_every_steps=1000",  # no validation, samples and checkpoints in between:
            "trainer.sample_every_steps=1000",  # the train/loss schedule is the point
            f"trainer.checkpoint_every_steps={STEPS}",
            f"tracking.uri={base}",
            "tracking.experiment=outage",
        ]
        sets = [a for o in overrides for a in ("--set", o)]
        train_log = tmp_path / "train.log"
        with train_log.open("w") as out:
            train = net.popen(
                1,
                [str(BIN / "aigc"), "train", "models/vae.yaml", "--name", "outage", "--no-eval",
                 "--no-register", "--metrics-out", str(tmp_path / "train.json"), *sets],
                env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip

        # The run's id, then its first train/loss in the store: the job is training. Kill then.
        deadline = time.monotonic() + 180
        run_id = None
        while True:
            assert train.poll() is None, train_log.read_text()[-4000:]
            assert time.monotonic() < deadline, train_log.read_text()[-4000:]
            if run_id is None:
                try:
                    exp = api(base, "experiments/get-by-name?experiment_name=outage")["experiment"]
                    found = api(base, "runs/search", {"experiment_ids": [exp["experiment_id"]]})
                    run_id = found["runs"][0]["info"]["run_id"] if found.get("runs") else None
                except (OSError, ValueError, KeyError):
                    pass
            if run_id is not None and loss_steps(base, run_id):
                break
            time.sleep(0.2)
        before = loss_steps(base, run_id)
        net.stop(server)  # SIGKILL to the server's process group: no goodbye to any client
        killed = time.monotonic()
        time.sleep(DOWN_S)
        assert train.poll() is None, "training ended while the server was down: no outage mid-run"
        server = start_server(net, store, server_log)
        up = time.monotonic()
        expected = list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
        while loss_steps(base, run_id) != expected and train.poll() is None:
            time.sleep(0.3)
        complete = time.monotonic()
        rc = train.wait(timeout=180)
        ended = time.monotonic()
        figures = (
            f"train/loss steps before the kill {before}; server down {up - killed:.1f} s "
            f"({DOWN_S:.0f} s dead + restart); all {len(expected)} steps in the store "
            f"{complete - up:.1f} s after it answered again; job ended {ended - up:.1f} s after"
        )
        print(figures)
        assert rc == 0, train_log.read_text()[-4000:]
        assert loss_steps(base, run_id) == expected, (figures, train_log.read_text()[-4000:])
        run = api(base, f"runs/get?run_id={run_id}")["run"]
        assert run["info"]["status"] == "FINISHED", run["info"]
        assert len(before) < len(expected), f"the outage came after the last train/loss: {figures}"

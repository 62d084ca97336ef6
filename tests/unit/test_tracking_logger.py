"""RunLogger against a tracking server that goes away: a fake MLflow client, no network.

The fake's ``log_batch`` raises what MLflow's client raises once its own retries are spent (or
are off: ``MLFLOW_HTTP_REQUEST_MAX_RETRIES=0``, which the driver hands to workers): an
``MlflowException`` with INTERNAL_ERROR, "API request to ... failed with exception ...".
"""

from __future__ import annotations

import threading
import time

import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

import aigc.tracking.logger as logger_module
from aigc.tracking import RunLogger, TrackingUnavailable

URI = "http://10.0.0.2:5000"


class FakeClient:
    """Records what arrives; refuses every request while ``down`` is set."""

    def __init__(self) -> None:
        self.down = threading.Event()
        self.metrics: list[tuple[str, int]] = []
        self.tags: list[tuple[str, str]] = []
        self.attempts = 0
        self.refuse_with: MlflowException | None = None

    def log_batch(self, run_id, metrics=(), params=(), tags=()):
        self.attempts += 1
        if self.refuse_with is not None:
            raise self.refuse_with
        if self.down.is_set():
            raise MlflowException(
                f"API request to {URI}/api/2.0/mlflow/runs/log-batch failed with exception "
                "HTTPConnectionPool: Max retries exceeded (Connection refused)"
            )
        self.metrics += [(m.key, m.step) for m in metrics]
        self.tags += [(t.key, t.value) for t in tags]


@pytest.fixture()
def client(monkeypatch: pytest.MonkeyPatch) -> FakeClient:
    fake = FakeClient()
    monkeypatch.setattr(logger_module, "client_for", lambda uri: fake)
    return fake


@pytest.mark.timeout(30)
def test_metrics_logged_while_the_server_is_down_arrive_in_order_once_it_answers(client) -> None:
    logger = RunLogger(URI, "r" * 32, flush_interval_s=0.02, retry_initial_s=0.05, retry_max_s=0.2)
    for step in range(1, 6):
        logger.log_metrics({"train/loss": 1.0}, step)
    assert logger.flush(timeout=5)
    client.down.set()  # the server dies
    for step in range(6, 41):
        logger.log_metrics({"train/loss": 1.0}, step)
        time.sleep(0.01)
    logger.set_tags({"phase": "outage"})
    time.sleep(0.5)  # several refused attempts
    assert client.metrics == [("train/loss", s) for s in range(1, 6)]
    client.down.clear()  # back on the same address
    for step in range(41, 51):
        logger.log_metrics({"train/loss": 1.0}, step)
    assert logger.close(timeout=10)
    assert client.metrics == [("train/loss", s) for s in range(1, 51)]  # none lost, in order
    assert client.tags == [("phase", "outage")]
    assert logger.errors > 0 and logger.lost == 0 and logger.dropped == 0


@pytest.mark.timeout(30)
def test_a_request_the_server_rejects_is_not_retried(client) -> None:
    client.refuse_with = MlflowException("bad key", error_code=INVALID_PARAMETER_VALUE)
    logger = RunLogger(URI, "r" * 32, flush_interval_s=0.02, retry_initial_s=0.05)
    logger.log_metrics({"train/loss": 1.0}, 1)
    assert logger.flush(timeout=5)
    assert client.attempts == 1 and logger.lost == 1
    client.refuse_with = None
    logger.log_metrics({"train/loss": 1.0}, 2)  # the logger goes on
    assert logger.close(timeout=5)
    assert client.metrics == [("train/loss", 2)]


@pytest.mark.timeout(30)
def test_a_server_dead_for_longer_than_the_bound_fails_the_caller_clearly(client) -> None:
    client.down.set()
    logger = RunLogger(
        URI, "r" * 32, flush_interval_s=0.02, retry_initial_s=0.05, retry_max_s=0.1, give_up_after_s=0.5
    )
    logger.log_metrics({"train/loss": 1.0}, 1)
    start = time.monotonic()
    with pytest.raises(TrackingUnavailable, match=r"10\.0\.0\.2:5000.*1 metric value"):
        logger.flush(timeout=10)  # bounded: not the flush's own timeout
    assert time.monotonic() - start < 5
    with pytest.raises(TrackingUnavailable, match="did not answer"):
        logger.log_metrics({"train/loss": 1.0}, 2)
    assert logger.close(timeout=5)
    assert client.metrics == [] and logger.lost == 1


@pytest.mark.timeout(30)
def test_an_artifact_logged_while_the_server_is_down_is_uploaded_once_it_answers(client, tmp_path) -> None:
    uploads: list[str] = []

    def log_artifact(run_id, local_path, artifact_path=None):
        if client.down.is_set():
            raise MlflowException(f"API request to {URI}/api/2.0/mlflow/runs/get failed (Connection refused)")
        uploads.append(local_path)

    client.log_artifact = log_artifact
    grid = tmp_path / "samples-final.png"
    grid.write_bytes(b"png")
    client.down.set()
    threading.Timer(0.4, client.down.clear).start()  # the server is back 0.4 s later
    logger = RunLogger(URI, "r" * 32, retry_initial_s=0.05, retry_max_s=0.1)
    logger.log_artifact(grid)  # waits for the server instead of failing the job's last step
    assert uploads == [str(grid)] and logger.errors > 0 and logger.lost == 0
    assert logger.close(timeout=5)


def test_a_resumed_job_does_not_log_a_step_twice(tmp_path) -> None:
    """A resumed job trains again the steps after its last checkpoint: their values, logged by the
    first launch already, are not logged again (ray#48664: two values at one step), and the steps
    past what the run had are. Real sqlite store."""
    from aigc.tracking import client_for, start_job_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = start_job_run(uri, "resume")
    first = RunLogger(uri, run_id, flush_interval_s=0.05)
    for step in (5, 10, 15):
        first.log_metrics({"train/loss": 1.0 / step, "val/loss": 2.0 / step}, step=step)
    first.close()
    # Resumed from the step-10 checkpoint: step 15 is trained (and logged) again, then 20.
    second = RunLogger(uri, run_id, flush_interval_s=0.05)
    for step in (15, 20):
        second.log_metrics({"train/loss": 9.0, "val/loss": 9.0}, step=step)
    second.log_metrics({"train/resumed_from_step": 10.0}, step=10)  # a key new to the run: sent
    second.close()
    client = client_for(uri)
    for key in ("train/loss", "val/loss"):
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        assert [s for s, _ in history] == [5, 10, 15, 20], history
        assert dict(history)[15] != 9.0  # the first value at a step wins
    assert second.replayed == 2
    assert [m.step for m in client.get_metric_history(run_id, "train/resumed_from_step")] == [10]

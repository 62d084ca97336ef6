"""aigc.tracking against real MLflow: a sqlite store in a temp folder and real ``mlflow server``
processes on 127.0.0.1, started and stopped by these tests (by process group id)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image
from typer.testing import CliRunner

from aigc.cli import app
from aigc.tracking import (
    NullRunLogger,
    RunLogger,
    TrackingUnavailable,
    end_job_run,
    ensure_tracking_store,
    job_run,
    lineage_tags,
    list_runs,
    log_dataset_input,
    resolve_tracking_uri,
    start_job_run,
)

ROOT = Path(__file__).resolve().parents[2]
DVC_MD5 = "0123456789abcdef0123456789abcdef.dir"  # 36 characters, like a DVC folder hash


@pytest.fixture(scope="module")
def migrated_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sqlite store created and migrated once by ``ensure_tracking_store`` (the schema migration
    takes seconds); each test copies the file, so tests stay isolated and quick."""
    path = tmp_path_factory.mktemp("template") / "new" / "deeper" / "mlflow.db"
    ensure_tracking_store(f"sqlite:///{path}")
    return path


@pytest.fixture()
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, migrated_store: Path) -> str:
    """A fresh sqlite store at the default place under a temp project root, so nothing lands in the
    repository's mlflow/ folder."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", raising=False)
    monkeypatch.setenv("AIGC_PROJECT_ROOT", str(tmp_path))
    uri = resolve_tracking_uri()
    assert uri == f"sqlite:///{tmp_path.resolve()}/mlflow/mlflow.db"
    shutil.copy(migrated_store, tmp_path / "mlflow" / "mlflow.db")
    return uri


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------- a whole job's run


@pytest.mark.timeout(120)
def test_job_run_records_params_tags_metrics_images_and_dataset(store: str, tmp_path: Path) -> None:
    # 250 params: more than one log_batch request (MLflow takes 100 per request).
    params = {"model": {"family": "vae", "width": 32}, "sweep": {f"p{i:03d}": i for i in range(248)}}
    tags = lineage_tags("vae", "digits", DVC_MD5, 2, "abc123")
    shard_dir = tmp_path / "datasets" / "digits"
    shard_dir.mkdir(parents=True)
    note = tmp_path / "note.txt"
    note.write_text("resolved config\n")

    with job_run(store, "aigc-test", "run-1", params, tags) as run:
        assert run.uri == store
        client = MlflowClient(store)
        assert client.get_run(run.run_id).info.status == "RUNNING"
        log_dataset_input(client, run.run_id, "digits", str(shard_dir), DVC_MD5)

        logger = RunLogger.for_rank(0, run.uri, run.run_id, flush_interval_s=0.2)
        assert isinstance(logger, RunLogger)
        calls = 0

        def train_loop() -> None:  # a separate thread, as in a Lightning callback
            nonlocal calls
            for step in range(300):
                logger.log_metrics({"train/loss": 1.0 / (step + 1), "perf/samples_per_s": 100.0 + step}, step)
                calls += 1
                if step % 50 == 0:
                    logger.log_metrics({"val/loss": 2.0 / (step + 1)}, step)
                    calls += 1
            grid = np.zeros((16, 16, 3), dtype=np.uint8)
            logger.log_image(grid, key="samples", step=0)
            grid[:8] = 255  # the logger copied the array: this change is not in step 0's image
            logger.log_image(Image.fromarray(grid), key="samples", step=10)

        thread = threading.Thread(target=train_loop)
        thread.start()
        thread.join(30)
        logger.log_artifact(note, artifact_path="config")
        assert logger.flush(timeout=30)
        assert logger.close(timeout=30)

    info = client.get_run(run.run_id)
    assert info.info.status == "FINISHED"
    assert info.data.params["model.family"] == "vae"
    assert info.data.params["sweep.p247"] == "247"
    assert len(info.data.params) == 250
    for key, value in tags.items():
        assert info.data.tags[key] == value
    assert info.info.run_name == "run-1"

    history = client.get_metric_history(run.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(300))
    assert {m.step: m.value for m in history}[9] == pytest.approx(0.1)
    assert len(client.get_metric_history(run.run_id, "val/loss")) == 6
    assert logger.metrics_sent == 606 and logger.errors == 0 and logger.dropped == 0
    assert logger.batches_sent < calls  # coalesced into log_batch requests

    images = [a.path for a in client.list_artifacts(run.run_id, "images")]
    pngs = sorted(p for p in images if p.endswith(".png"))
    assert len(pngs) == 2 and any("samples+step+10+" in p for p in pngs)
    step0 = next(p for p in pngs if "samples+step+0+" in p)
    local = client.download_artifacts(run.run_id, step0, str(tmp_path / "dl"))
    assert np.asarray(Image.open(local)).max() == 0
    assert [a.path for a in client.list_artifacts(run.run_id, "config")] == ["config/note.txt"]

    # Artifacts land next to the store, under the experiment's folder, not in ./mlruns.
    experiment = client.get_experiment(run.experiment_id)
    assert (
        experiment.artifact_location == (tmp_path / "mlflow" / "artifacts" / "aigc-test").resolve().as_uri()
    )
    assert (tmp_path / "mlflow" / "artifacts" / "aigc-test" / run.run_id / "artifacts" / "config").is_dir()

    (dataset_input,) = info.inputs.dataset_inputs
    assert dataset_input.dataset.name == "digits"
    assert dataset_input.dataset.digest == DVC_MD5
    assert str(shard_dir) in dataset_input.dataset.source
    assert {t.key: t.value for t in dataset_input.tags}["mlflow.data.context"] == "training"


def test_job_run_ends_failed_with_error_tag_and_reraises(store: str) -> None:
    with pytest.raises(RuntimeError, match="loss is NaN"), job_run(store, "aigc-test", "bad") as run:
        raise RuntimeError("loss is NaN at step 7")
    info = MlflowClient(store).get_run(run.run_id)
    assert info.info.status == "FAILED"
    error = info.data.tags["aigc.error"]
    assert error.startswith("RuntimeError: loss is NaN at step 7")
    assert "Traceback" in error
    assert info.info.end_time is not None


def test_job_run_ends_killed_on_keyboard_interrupt(store: str) -> None:
    with pytest.raises(KeyboardInterrupt), job_run(store, "aigc-test", "stopped") as run:
        raise KeyboardInterrupt
    assert MlflowClient(store).get_run(run.run_id).info.status == "KILLED"


@pytest.mark.timeout(120)
def test_run_opener_opens_in_a_child_what_start_job_run_opens_and_relays_its_errors(store: str) -> None:
    """aigc train's driver opens its run through RunOpener (a child process): the same params, tags
    and dataset as in-process, a deleted experiment refused with the same message, an abandoned run
    ended FAILED with the driver's error, never left RUNNING."""
    from aigc.tracking import RunOpener

    tags = lineage_tags("vae", "digits", DVC_MD5, 2, "abc123")
    dataset = {"name": "digits", "source": "/data/digits", "digest": DVC_MD5}
    run = RunOpener(store, "aigc-open", "child", {"trainer": {"max_steps": 7}}, tags, dataset).result()
    client = MlflowClient(store)
    info = client.get_run(run.run_id)
    assert info.info.status == "RUNNING" and info.info.run_name == "child"
    assert info.info.experiment_id == run.experiment_id
    assert info.data.params == {"trainer.max_steps": "7"}
    assert {k: info.data.tags[k] for k in tags} == tags
    assert [d.dataset.digest for d in info.inputs.dataset_inputs] == [DVC_MD5]

    client.delete_experiment(run.experiment_id)
    with pytest.raises(ValueError, match="is deleted: restore it"):
        RunOpener(store, "aigc-open", "refused", {}, {}).result()

    opener = RunOpener(store, "aigc-abandoned", "abandoned", {"a": 1}, {})
    opener.abandon(RuntimeError("tokenizer failed on shard x"))
    experiment = client.get_experiment_by_name("aigc-abandoned")
    (abandoned,) = client.search_runs([experiment.experiment_id])
    assert abandoned.info.status == "FAILED"
    assert abandoned.data.tags["aigc.error"].startswith("RuntimeError: tokenizer failed on shard x")


def test_end_job_run_truncates_long_errors_keeping_the_end(store: str) -> None:
    run_id = start_job_run(store, "aigc-test", "long-error")
    error = "frame\n" * 5000 + "ValueError: the real cause"
    end_job_run(store, run_id, "FAILED", error)
    info = MlflowClient(store).get_run(run_id)
    assert info.info.status == "FAILED"
    tag = info.data.tags["aigc.error"]
    assert len(tag) <= 8000 and tag.endswith("ValueError: the real cause") and "chars truncated" in tag
    with pytest.raises(ValueError, match="FINISHED, FAILED, KILLED"):
        end_job_run(store, run_id, "DONE")


# ------------------------------------------------------------------------------ logger edge cases


def test_non_zero_ranks_log_nothing(store: str) -> None:
    run_id = start_job_run(store, "aigc-test", "ranks")
    for rank in (1, 3):
        logger = RunLogger.for_rank(rank, store, run_id)
        assert isinstance(logger, NullRunLogger) and not isinstance(logger, RunLogger)
        logger.log_metrics({"train/loss": 1.0}, 0)
        logger.log_image(np.zeros((4, 4), dtype=np.uint8), step=0)
        assert logger.flush() and logger.close()
    assert isinstance(RunLogger.for_rank(0, None, None), NullRunLogger)
    end_job_run(store, run_id)
    assert MlflowClient(store).get_run(run_id).data.metrics == {}


def test_bad_values_fail_in_the_caller_naming_the_key(store: str) -> None:
    run_id = start_job_run(store, "aigc-test", "bad-values")
    with RunLogger(store, run_id) as logger:
        with pytest.raises(TypeError, match="'train/loss'"):
            logger.log_metrics({"train/loss": "nan?"}, 0)
        with pytest.raises(ValueError, match="'bad,key'"):
            logger.log_metrics({"bad,key": 1.0}, 0)
        with pytest.raises(ValueError, match="out of acceptable range"):
            logger.log_image(np.full((4, 4), 300, dtype=np.int32), step=0)
        with pytest.raises(FileNotFoundError, match="missing.txt"):
            logger.log_artifact("/nonexistent/missing.txt")
    with pytest.raises(ValueError, match="1..36 characters"):
        log_dataset_input(MlflowClient(store), run_id, "digits", "/data/digits", "x" * 40)
    end_job_run(store, run_id)


@pytest.mark.timeout(60)
def test_logging_never_blocks_on_a_dead_server() -> None:
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    logger = RunLogger(uri, "0" * 32, flush_interval_s=0.05)
    start = time.monotonic()
    for step in range(2000):
        logger.log_metrics({"train/loss": 0.5}, step)
    logging_s = time.monotonic() - start
    assert logging_s < 2.0, f"2000 log_metrics calls took {logging_s:.2f} s"
    start = time.monotonic()
    logger.close(timeout=1.0)  # cannot drain (the client is retrying), but must return
    assert time.monotonic() - start < 3.0
    assert logger.metrics_sent == 0


@pytest.mark.timeout(60)
def test_system_metrics_are_logged_to_the_run(store: str) -> None:
    run_id = start_job_run(store, "aigc-test", "system")
    logger = RunLogger(store, run_id, system_metrics=True, system_metrics_interval_s=0.3)
    deadline = time.monotonic() + 20
    keys: list[str] = []
    while time.monotonic() < deadline and not keys:
        time.sleep(0.5)
        keys = [k for k in MlflowClient(store).get_run(run_id).data.metrics if k.startswith("system/")]
    logger.close()
    end_job_run(store, run_id)
    if not keys:  # the monitor buffers; close() flushes it
        keys = [k for k in MlflowClient(store).get_run(run_id).data.metrics if k.startswith("system/")]
    assert "system/cpu_utilization_percentage" in keys


# ---------------------------------------------------------------------------------- store checks


def test_ensure_creates_and_migrates_a_fresh_sqlite_store(migrated_store: Path) -> None:
    # migrated_store was a path in folders that did not exist before ensure_tracking_store ran.
    assert migrated_store.is_file()
    uri = f"sqlite:///{migrated_store}"
    assert [e.name for e in MlflowClient(uri).search_experiments()] == ["Default"]
    ensure_tracking_store(uri)  # a second call in the same process is a no-op


@pytest.mark.timeout(30)
def test_unreachable_server_fails_fast_with_a_clear_message() -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(TrackingUnavailable, match="unreachable") as err:
        ensure_tracking_store(uri)
    assert time.monotonic() - start < 10.0
    assert uri in str(err.value) and "MLFLOW_TRACKING_URI" in str(err.value)
    with pytest.raises(TrackingUnavailable):
        start_job_run(uri, "aigc-test", "never")


@pytest.mark.timeout(30)
def test_a_server_that_never_answers_hits_the_timeout() -> None:
    with socket.socket() as listener:  # accepts connections (kernel backlog) but never replies
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        uri = f"http://127.0.0.1:{listener.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(TrackingUnavailable, match=uri):
            ensure_tracking_store(uri, timeout_s=2.0)
        assert time.monotonic() - start < 5.0


# ------------------------------------------------------------------------------------ aigc runs


def test_list_runs_and_the_runs_command(store: str) -> None:
    with job_run(store, "aigc-test", "listed", tags=lineage_tags("gan", "digits", None, 1, None)) as run:
        logger = RunLogger(store, run.run_id)
        logger.log_metrics({"train/loss": 0.25, "eval/fd": 12.5}, 3)
        logger.close()
    start_job_run(store, "other", "elsewhere")

    runs = list_runs(store, experiment="aigc-test")
    assert [r["run_id"] for r in runs] == [run.run_id]
    (listed,) = runs
    assert listed["status"] == "FINISHED" and listed["family"] == "gan"
    assert listed["metrics"] == {"train/loss": 0.25, "eval/fd": 12.5}
    assert listed["duration_s"] is not None and listed["duration_s"] >= 0
    assert {r["run_name"] for r in list_runs(store)} == {"listed", "elsewhere"}

    result = CliRunner().invoke(app, ["runs", "--uri", store, "-e", "aigc-test"])
    assert result.exit_code == 0, result.output
    header, row = result.output.strip().splitlines()
    assert header.split()[:3] == ["run", "id", "name"] and "eval/cond_accuracy" in header
    cells = row.split()
    assert cells[:4] == [run.run_id, "listed", "FINISHED", "gan"]
    assert "0.25" in cells and "12.5" in cells

    missing = CliRunner().invoke(app, ["runs", "--uri", store, "-e", "nope"])
    assert missing.exit_code == 1 and "'nope'" in missing.output and "aigc-test" in missing.output


# ------------------------------------------------------------------------------- real servers


def _start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    # Own session = own process group: uvicorn's workers are stopped with the server.
    with log.open("wb") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_healthy(proc: subprocess.Popen[bytes], port: int, log: Path, within_s: float = 60.0) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"mlflow server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"mlflow server not healthy after {within_s} s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.fixture()
def server_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["AIGC_PROJECT_ROOT"] = str(tmp_path)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _log_a_run_through(uri: str) -> str:
    with job_run(uri, "served", "through-server", {"trainer": {"max_steps": 5}}) as run:
        logger = RunLogger(uri, run.run_id, flush_interval_s=0.1)
        for step in range(5):
            logger.log_metrics({"train/loss": 1.0 - step / 10}, step)
        logger.log_image(np.full((8, 8, 3), 128, dtype=np.uint8), key="samples", step=4)
        assert logger.close(timeout=20) and logger.errors == 0
    return run.run_id


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_aigc_ui_serves_the_local_store(tmp_path: Path, server_env: dict[str, str]) -> None:
    port = free_port()
    store = f"sqlite:///{tmp_path}/mlflow/mlflow.db"
    log = tmp_path / "ui.log"
    cmd = [
        sys.executable,
        "-c",
        "from aigc.cli import main; main()",
        "ui",
        "--port",
        str(port),
        "--uri",
        store,
    ]
    proc = _start(cmd, server_env, log)
    try:
        _wait_healthy(proc, port, log)
        http = f"http://127.0.0.1:{port}"
        ensure_tracking_store(http)
        run_id = _log_a_run_through(http)
        # The server wrote into the local store: a sqlite client sees the same run and files.
        local = MlflowClient(store)
        run = local.get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.params["trainer.max_steps"] == "5"
        assert [m.value for m in local.get_metric_history(run_id, "train/loss")] == pytest.approx(
            [1.0, 0.9, 0.8, 0.7, 0.6]
        )
        assert any(a.path.endswith(".png") for a in MlflowClient(http).list_artifacts(run_id, "images"))
        assert (tmp_path / "mlflow" / "artifacts").is_dir()
    finally:
        _stop(proc)
    assert proc.returncode is not None


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_start_server_script_with_auth_proxies_artifacts_for_users_it_knows_only(
    tmp_path: Path, server_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shared server as the Kubernetes Deployment runs it: basic auth on, artifacts proxied."""
    from aigc.tracking import TrackingUnavailable, ensure_tracking_store

    port = free_port()
    destination = tmp_path / "proxied"
    env = {
        **server_env,
        "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp_path}/server.db",
        "MLFLOW_ARTIFACTS_DESTINATION": str(destination),
        "MLFLOW_WORKERS": "1",
        "MLFLOW_AUTH_ADMIN_PASSWORD": "an-admin-password-1",
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "a-test-secret-key",
        "MLFLOW_AUTH_DATABASE_URI": f"sqlite:///{tmp_path}/auth.db",
    }
    log = tmp_path / "server.log"
    proc = _start([str(ROOT / "mlflow" / "start-server.sh"), "--port", str(port), "--auth"], env, log)
    try:
        _wait_healthy(proc, port, log)
        http = f"http://127.0.0.1:{port}"
        request = urllib.request.Request(f"{http}/api/2.0/mlflow/experiments/search?max_results=1")
        with pytest.raises(urllib.error.HTTPError) as anonymous:
            urllib.request.urlopen(request, timeout=10)
        assert anonymous.value.code == 401
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong")
        with pytest.raises(TrackingUnavailable, match="rejected the credentials"):
            ensure_tracking_store(http)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "an-admin-password-1")
        ensure_tracking_store(http)
        run_id = _log_a_run_through(http)
        client = MlflowClient(http)
        assert client.get_run(run_id).info.artifact_uri.startswith("mlflow-artifacts:")
        # Uploaded through the server into its artifacts destination.
        assert list(destination.rglob("images/samples+step+4+*.png"))
    finally:
        _stop(proc)

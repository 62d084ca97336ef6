"""mlflow/init-users.py against a real basic-auth MLflow server, started as the Kubernetes
Deployment starts it (mlflow/start-server.sh --auth, default permission NO_PERMISSIONS).

The script runs twice (the second run changes nothing), then the training user does what a
training job does (a run, a metric, a logged model, a model version and its candidate alias) and
the serving user does what a serving replica does (resolve the alias, find and download the
model's files) and is refused (403) when it tries to log, register or move an alias. The server
runs in its own process group, stopped by that group's id.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from s3_server import stop_group, wait_until_answers

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "mlflow" / "init-users.py"
ADMIN = ("admin", "an-admin-password-1")
JOB = ("aigc-train", "a-job-password-1")
SERVING = ("aigc-serve", "a-serving-password-1")
MODEL = "aigc-diffusion"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("mlflow-users")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        AIGC_PROJECT_ROOT=str(tmp),
        MLFLOW_BACKEND_STORE_URI=f"sqlite:///{tmp}/server.db",
        MLFLOW_ARTIFACTS_DESTINATION=str(tmp / "artifacts"),
        MLFLOW_WORKERS="1",
        MLFLOW_AUTH_ADMIN_USERNAME=ADMIN[0],
        MLFLOW_AUTH_ADMIN_PASSWORD=ADMIN[1],
        MLFLOW_FLASK_SERVER_SECRET_KEY="a-test-secret-key",
        MLFLOW_AUTH_DATABASE_URI=f"sqlite:///{tmp}/auth.db",
        MLFLOW_AUTH_DEFAULT_PERMISSION="NO_PERMISSIONS",  # as k8s/base/mlflow.yaml
    )
    log = tmp / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(ROOT / "mlflow" / "start-server.sh"), "--port", str(port), "--auth"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: the server's workers stop with it
        )
    try:
        wait_until_answers(f"http://127.0.0.1:{port}/health", proc, log, timeout=60)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_group(proc)


def _init_users(uri: str, **extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AIGC_MLFLOW_"))}
    env.update(
        {
            "MLFLOW_TRACKING_URI": uri,
            "MLFLOW_AUTH_ADMIN_USERNAME": ADMIN[0],
            "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN[1],
            "AIGC_MLFLOW_JOB_USERNAME": JOB[0],
            "AIGC_MLFLOW_JOB_PASSWORD": JOB[1],
            "AIGC_MLFLOW_SERVING_USERNAME": SERVING[0],
            "AIGC_MLFLOW_SERVING_PASSWORD": SERVING[1],
            "AIGC_MLFLOW_WAIT_S": "20",
            **extra,
        }
    )
    # The image's python, without the repository on sys.path: the script is standard library only.
    return subprocess.run(
        [sys.executable, "-I", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120, check=False
    )


def _client(uri: str, user: tuple[str, str], monkeypatch: pytest.MonkeyPatch):
    """A client logged in as ``user``. MLflow reads the credentials from the environment at each
    request, so the last client made decides who every client is: use each one before the next."""
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", user[1])
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    return MlflowClient(uri)


def _refused(call) -> None:
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException) as refused:
        call()
    assert refused.value.get_http_status_code() == 403, refused.value


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_init_users_grants_training_and_serving_exactly_what_they_need(
    server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aigc.registry.versions import model_location, resolve_version
    from aigc.tracking import get_or_create_experiment

    first = _init_users(server)
    assert first.returncode == 0, first.stderr
    for made in (
        f"created user '{JOB[0]}'",
        f"created user '{SERVING[0]}'",
        f"created registered model '{MODEL}'",
    ):
        assert made in first.stdout
    again = _init_users(server)
    assert again.returncode == 0, again.stderr
    # Idempotent: the second run finds everything in place and changes nothing.
    assert again.stdout.strip().splitlines() == [first.stdout.strip().splitlines()[-1]]

    # The training job: its experiment, a run with a metric, a logged model, a version, the alias.
    job = _client(server, JOB, monkeypatch)
    experiment_id = get_or_create_experiment(job, "aigc")
    run_id = job.create_run(experiment_id).info.run_id
    job.log_metric(run_id, "train/loss", 0.5, step=1)
    files = tmp_path / "model"
    files.mkdir()
    (files / "MLmodel").write_text("flavors: {}\n")
    logged = job.create_logged_model(experiment_id, name="model", source_run_id=run_id)
    job.log_model_artifacts(logged.model_id, str(files))
    version = job.create_model_version(
        MODEL, f"models:/{logged.model_id}", run_id=run_id, model_id=logged.model_id, await_creation_for=0
    ).version
    job.set_registered_model_alias(MODEL, "candidate", version)
    job.set_terminated(run_id)
    # ... and no more: the model is not its to delete, nor the admin's own experiments to read.
    _refused(lambda: job.delete_registered_model(MODEL))

    # The serving replica: the version behind the alias, its files through the artifact proxy.
    import mlflow.artifacts

    serving = _client(server, SERVING, monkeypatch)
    found = resolve_version(serving, f"{MODEL}@candidate")
    assert found.version == version
    location = model_location(serving, found)
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=f"{location}/MLmodel", dst_path=str(tmp_path / "download"), tracking_uri=server
    )
    assert Path(local).read_text() == "flavors: {}\n"
    # Read only: no logging to the job's run, no run of its own there, no new version, no alias.
    _refused(lambda: serving.log_metric(run_id, "train/loss", 0.1))
    _refused(lambda: serving.create_run(experiment_id))
    _refused(
        lambda: serving.create_model_version(
            MODEL, f"models:/{logged.model_id}", run_id=run_id, model_id=logged.model_id, await_creation_for=0
        )
    )
    _refused(lambda: serving.set_registered_model_alias(MODEL, "production", version))

    # With NO_PERMISSIONS as the default, what the admin makes stays the admin's.
    admin = _client(server, ADMIN, monkeypatch)
    private = admin.create_experiment("admin-only")
    _refused(lambda: _client(server, JOB, monkeypatch).get_experiment(private))

    # A Secret's new password reaches its user on the next run, and only that user's.
    rotated = _init_users(server, AIGC_MLFLOW_SERVING_PASSWORD="a-rotated-password-2")
    assert rotated.returncode == 0, rotated.stderr
    assert f"user '{SERVING[0]}': password reset" in rotated.stdout
    assert f"user '{JOB[0]}': password reset" not in rotated.stdout
    assert resolve_version(_client(server, (SERVING[0], "a-rotated-password-2"), monkeypatch), f"{MODEL}/1")


@pytest.mark.timeout(60)
def test_init_users_refuses_bad_settings(server: str) -> None:
    same_name = _init_users(server, AIGC_MLFLOW_SERVING_USERNAME=ADMIN[0])
    assert same_name.returncode == 2 and "three different names" in same_name.stderr
    wrong_admin = _init_users(server, MLFLOW_AUTH_ADMIN_PASSWORD="not-the-admin-pw", AIGC_MLFLOW_WAIT_S="0")
    assert wrong_admin.returncode == 1 and "rejected (HTTP 401)" in wrong_admin.stderr

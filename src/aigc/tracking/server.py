"""The ``mlflow server`` command line for the UI over the project's local store (``aigc ui``)."""

from __future__ import annotations

import os
import sys

from aigc.tracking.backend import default_artifact_root, is_local_store, sqlite_path

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5000
JOB_EXECUTION_ENV = "MLFLOW_SERVER_ENABLE_JOB_EXECUTION"

# The UI of MLflow 3.17 opens every experiment in its GenAI view (traces, judges, "Evaluation
# runs") unless the page's URL says otherwise: its "GenAI | Model training" switch is a browser
# setting (localStorage "mlflow.workflowType", default "genai") that the URL parameter below
# overrides, and it ignores the experiment's mlflow.experimentKind tag while that switch is shown.
# Every link aigc prints carries the parameter, so a training run opens as a training run.
UI_VIEW = "workflowType=machine_learning"


def ui_url(path: str = "", host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> str:
    """A link into the UI in its model-training view, e.g. ``ui_url("experiments/1/runs/<id>")``."""
    return f"http://{host}:{port}/#/{path.strip('/')}?{UI_VIEW}"


def mlflow_server_command(
    uri: str,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    artifact_root: str | None = None,
    workers: int = 1,
) -> list[str]:
    """``python -m mlflow server ...`` serving the local store ``uri`` on ``host:port``.

    Artifacts are not proxied (``--no-serve-artifacts``): runs in a local store keep ``file://``
    artifact locations that the server reads directly, and an experiment created from the UI gets
    ``artifact_root`` (default: the store's artifact folder), so local clients can still write to it.
    One worker: this is a UI for one person, not a shared server (see mlflow/start-server.sh).
    """
    if not is_local_store(uri):
        raise ValueError(f"{uri} is a tracking server already: open it in a browser instead of serving it")
    return [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        uri,
        "--default-artifact-root",
        artifact_root or default_artifact_root(uri),
        "--no-serve-artifacts",
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
    ]


def exec_mlflow_server(uri: str, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> None:
    """Replace this process with the MLflow UI server (Ctrl-C stops it); does not return.

    ``mlflow server`` creates or migrates the store itself before its worker starts, so this process
    never imports mlflow (seconds saved at start-up); only a sqlite store's folder is created. MLflow's job
    runner (eight huey consumer processes for GenAI features training does not use) is off unless
    ``MLFLOW_SERVER_ENABLE_JOB_EXECUTION`` says otherwise: on a laptop it costs seconds of start-up
    and a few hundred MB.
    """
    cmd = mlflow_server_command(uri, host, port)
    if uri.startswith("sqlite:") and (path := sqlite_path(uri)) is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault(JOB_EXECUTION_ENV, "false")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(cmd[0], cmd)

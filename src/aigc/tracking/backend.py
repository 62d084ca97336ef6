"""Where the MLflow store is, and making sure it answers before a job starts.

The driver resolves one absolute tracking URI and hands it to every Ray worker: workers run with
the Ray session folder as their working directory, so a relative ``sqlite:///mlflow.db`` would
point each of them at a different, empty store.
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path
from urllib.parse import urlsplit

from aigc import DURABLE_SETTINGS_HINT, project_root, ray_package

ENV_TRACKING_URI = "MLFLOW_TRACKING_URI"

# sqlite stores this process has already touched: the schema migration runs once, in the driver.
_initialised_stores: set[str] = set()
_init_lock = threading.Lock()


class TrackingUnavailable(RuntimeError):
    """The tracking store cannot be reached or opened; the message names the URI and what to check."""


def resolve_tracking_uri(explicit: str | None = None) -> str:
    """The absolute MLflow tracking URI for this job.

    ``explicit`` (e.g. ``tracking.uri`` from the config) wins, then ``MLFLOW_TRACKING_URI``, then
    ``sqlite:///<project root>/mlflow/mlflow.db`` (its folder is created), except inside a Ray
    working-dir package (:func:`aigc.ray_package`), where that default raises ``TrackingUnavailable``.
    Relative sqlite paths and relative file-store paths are made absolute against the working
    directory; http(s) and other remote URIs are returned unchanged.
    """
    uri = explicit or os.environ.get(ENV_TRACKING_URI) or ""
    uri = uri.strip()
    if not uri:
        package = ray_package()
        if package is not None:
            # `ray job submit --working-dir .` runs the job in a package Ray deletes with its session,
            # and the submitter's MLFLOW_TRACKING_URI does not reach the job: refuse, don't lose runs.
            raise TrackingUnavailable(
                f"no MLflow tracking URI is set ({ENV_TRACKING_URI}, tracking.uri), and the default store "
                f"would be {project_root() / 'mlflow' / 'mlflow.db'}, inside the Ray working-dir package "
                f"{package.name} that Ray deletes with its session. {DURABLE_SETTINGS_HINT}."
            )
        folder = project_root() / "mlflow"
        folder.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{folder / 'mlflow.db'}"
    return _absolute_uri(uri)


def client_for(tracking_uri: str | None = None):
    """The one way aigc builds an ``MlflowClient``: on the resolved store (:func:`resolve_tracking_uri`),
    with the model registry on the same store."""
    from mlflow import MlflowClient

    uri = resolve_tracking_uri(tracking_uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _absolute_uri(uri: str) -> str:
    if uri.startswith("sqlite:"):
        path = sqlite_path(uri)
        if path is None:  # in-memory (sqlite://): nothing to resolve
            return uri
        query = uri.split("?", 1)[1] if "?" in uri else ""
        return f"sqlite:///{path}" + (f"?{query}" if query else "")
    if uri.startswith("file:"):
        rest = uri[len("file:") :]
        if rest.startswith("//"):
            return uri  # file:///abs or file://host/abs: already absolute
        return Path(rest).expanduser().resolve().as_uri()
    if uri == "databricks" or re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", uri):
        return uri  # http(s)://, postgresql://, databricks, databricks://profile: not a local path
    # A bare path is MLflow's (deprecated) file store.
    return Path(uri).expanduser().resolve().as_uri()


def sqlite_path(uri: str) -> Path | None:
    """The absolute database file of a ``sqlite:`` URI, or None for an in-memory database.

    ``sqlite:///rel.db`` is relative to the working directory, ``sqlite:////abs.db`` is absolute.
    """
    if not uri.startswith("sqlite:"):
        raise ValueError(f"not a sqlite URI: {uri!r}")
    rest = uri[len("sqlite:") :].split("?", 1)[0]
    if rest in ("", "//"):
        return None
    if not rest.startswith("///"):
        raise ValueError(
            f"cannot read sqlite tracking URI {uri!r}: expected sqlite:///relative.db or sqlite:////abs.db"
        )
    path = rest[3:]
    if path in ("", ":memory:"):
        return None
    return Path(path).expanduser().resolve()


def is_local_store(uri: str) -> bool:
    """True for stores this machine writes directly (a resolved sqlite or file URI), false for servers."""
    return uri.startswith(("sqlite:", "file:"))


def default_artifact_root(uri: str | None = None) -> str:
    """Artifact root (a ``file://`` URI) for experiments created in a local store.

    With no ``uri`` (or a non-sqlite one) it is ``<project root>/mlflow/artifacts``; for a sqlite
    store it is the ``artifacts/`` folder next to the database file, which is the same folder for the
    default store and keeps a test's temporary store self-contained.
    """
    folder = project_root() / "mlflow" / "artifacts"
    if uri is not None and uri.startswith("sqlite:"):
        path = sqlite_path(uri)
        if path is not None:
            folder = path.parent / "artifacts"
    return folder.as_uri()


def ensure_tracking_store(uri: str, timeout_s: float = 10.0) -> None:
    """Check the store answers, and initialise a local sqlite schema once, before workers start.

    http(s): one request with no retries (MLflow's client otherwise retries for minutes), bounded by
    ``timeout_s`` even if DNS hangs; raises ``TrackingUnavailable`` naming the URI and what to check.
    sqlite: creates the database's folder and runs the schema migration in this process, so two
    ranks never race on it ("duplicate column name").
    """
    if uri.startswith(("http://", "https://")):
        _check_http_store(uri, timeout_s)
    elif uri.startswith("sqlite:"):
        _init_sqlite_store(uri)
    elif uri.startswith("file:"):
        Path(urlsplit(uri).path).mkdir(parents=True, exist_ok=True)


def _init_sqlite_store(uri: str) -> None:
    with _init_lock:
        if uri in _initialised_stores:
            return
        path = sqlite_path(uri)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        try:
            client_for(uri).search_experiments(max_results=1)
        except Exception as e:  # noqa: BLE001 - any failure here means the store is unusable
            raise TrackingUnavailable(
                f"cannot open the MLflow store {uri}: {e}. Check the file is writable and not a "
                "database from another program."
            ) from e
        _initialised_stores.add(uri)


def _check_http_store(uri: str, timeout_s: float) -> None:
    outcome: dict[str, object] = {}

    def probe() -> None:
        from mlflow.utils.credentials import get_default_host_creds
        from mlflow.utils.rest_utils import http_request

        try:
            # The experiments search endpoint rather than /health: it also proves the credentials
            # (MLFLOW_TRACKING_USERNAME/TOKEN) are accepted. Explicit max_retries=0: no minutes of
            # back-off, and no process-wide environment changes.
            response = http_request(
                get_default_host_creds(uri),
                "/api/2.0/mlflow/experiments/search",
                "POST",
                max_retries=0,
                backoff_factor=0,
                timeout=max(timeout_s - 0.5, 0.5),
                raise_on_status=False,
                json={"max_results": 1},
            )
            outcome["status"] = response.status_code
            outcome["text"] = response.text[:300]
        except Exception as e:  # noqa: BLE001 - reported to the caller below
            outcome["error"] = e

    thread = threading.Thread(target=probe, name="aigc-tracking-probe", daemon=True)
    thread.start()
    thread.join(timeout_s)
    hint = (
        "Check the server is running and reachable from here (mlflow/start-server.sh or `aigc ui` "
        f"starts one), or unset {ENV_TRACKING_URI} to use the local store."
    )
    if thread.is_alive():
        raise TrackingUnavailable(
            f"MLflow tracking server {uri} did not answer within {timeout_s:.0f} s. {hint}"
        )
    if "error" in outcome:
        err = outcome["error"]
        raise TrackingUnavailable(
            f"MLflow tracking server {uri} is unreachable ({type(err).__name__}: {err}). {hint}"
        )
    status = int(outcome["status"])  # type: ignore[arg-type]
    if status in (401, 403):
        raise TrackingUnavailable(
            f"MLflow tracking server {uri} rejected the credentials (HTTP {status}). Check "
            "MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN."
        )
    if status != 200:
        raise TrackingUnavailable(
            f"MLflow tracking server {uri} answered HTTP {status} ({outcome.get('text')!s}). Check the URI "
            f"points at an MLflow server. {hint}"
        )

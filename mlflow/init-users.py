#!/usr/bin/env python3
"""Create MLflow's least-privilege users for aigc on a running basic-auth server; safe to rerun.

    python mlflow/init-users.py          (settings from the environment, below)

Against `mlflow server --app-name basic-auth` (mlflow/start-server.sh --auth), logged in as the
admin, this makes sure that:

- the experiments in AIGC_MLFLOW_EXPERIMENTS and the registered models in AIGC_MLFLOW_MODELS exist
  (created by the admin when missing, so the grants below have something to point at);
- the training user exists with the password given, is no admin, and holds EDIT on those
  experiments (create runs, log params/metrics/artifacts/logged models, set tags) and EDIT on
  those registered models (create versions, set the candidate alias; no delete, no grants);
- the serving user exists with the password given, is no admin, and holds READ on those
  registered models and READ on those experiments (the versions' files are logged models in the
  experiment's artifact store, downloaded through the server's artifact proxy).

Pair it with `default_permission = NO_PERMISSIONS` (MLFLOW_AUTH_DEFAULT_PERMISSION for
start-server.sh): with MLflow's READ default every user reads every experiment and model anyway.
A user that exists gets its password reset to the one given only when that password fails to log
in, and its admin flag cleared; a grant that exists at another level is replaced. Nothing else is
touched (other users, other grants, what was logged).

Environment (the Kubernetes Job k8s/base/mlflow-users.yaml sets it from the Secrets):
  MLFLOW_TRACKING_URI            the server, e.g. http://mlflow:5000 (required)
  MLFLOW_AUTH_ADMIN_USERNAME     the admin (default admin)
  MLFLOW_AUTH_ADMIN_PASSWORD     its password (required)
  AIGC_MLFLOW_JOB_USERNAME       the training user, and _PASSWORD (both required)
  AIGC_MLFLOW_SERVING_USERNAME   the serving user, and _PASSWORD (both required)
  AIGC_MLFLOW_EXPERIMENTS        comma-separated experiment names (default aigc)
  AIGC_MLFLOW_MODELS             comma-separated registered model names (default aigc-diffusion)
  AIGC_MLFLOW_WAIT_S             how long to wait for the server to answer (default 300)

Standard library only: it runs from a ConfigMap in any image with Python 3.9+. Exit status 0 when
everything is in place, 1 on an error (message on stderr), 2 on missing settings.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

TIMEOUT_S = 15.0


class InitError(Exception):
    pass


class Api:
    """MLflow's REST API with basic auth (stdlib only)."""

    def __init__(self, base: str, username: str, password: str) -> None:
        self.base = base.rstrip("/")
        token = base64.b64encode(f"{username}:{password}".encode()).decode()
        self.headers = {"Authorization": f"Basic {token}", "Content-Type": "application/json"}

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
        """(HTTP status, JSON body or {"message": text}); raises OSError when nothing answers."""
        url = f"{self.base}{path}"
        data = None
        if body is not None and method == "GET":
            url += "?" + urllib.parse.urlencode(body)
        elif body is not None:
            data = json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, method=method, headers=self.headers)
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as err:
            status, raw = err.code, err.read()
        try:
            parsed = json.loads(raw or b"{}")
        except ValueError:
            parsed = {"message": raw.decode(errors="replace")[:500]}
        return status, parsed if isinstance(parsed, dict) else {"value": parsed}

    def ok(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        status, reply = self.call(method, path, body)
        if status != 200:
            raise InitError(f"{method} {path} -> HTTP {status}: {reply.get('message', reply)}")
        return reply


def wait_for_server(admin: Api, wait_s: float) -> None:
    """Until /health answers and the admin logs in (the user store is made at the server's start)."""
    deadline = time.monotonic() + wait_s
    last = "no answer"
    while True:
        try:
            status, reply = admin.call("GET", "/api/2.0/mlflow/users/current")
            if status == 200:
                if not reply.get("user", {}).get("is_admin"):
                    raise InitError(f"{reply.get('user', {}).get('username')!r} is not an MLflow admin")
                return
            if status == 401:
                last = "the admin's user name or password is rejected (HTTP 401)"
            elif status == 404:
                raise InitError("the server has no basic-auth app (start it with --app-name basic-auth)")
            else:
                last = f"HTTP {status}: {reply.get('message', reply)}"
        except OSError as err:
            last = str(err)
        if time.monotonic() >= deadline:
            raise InitError(f"{admin.base} not ready after {wait_s:.0f} s: {last}")
        time.sleep(2.0)


def ensure_experiment(admin: Api, name: str) -> str:
    status, reply = admin.call("GET", "/api/2.0/mlflow/experiments/get-by-name", {"experiment_name": name})
    if status == 200:
        experiment = reply["experiment"]
        if experiment.get("lifecycle_stage") == "deleted":
            raise InitError(
                f"experiment {name!r} (id {experiment['experiment_id']}) is deleted: restore it first"
            )
        return str(experiment["experiment_id"])
    if reply.get("error_code") != "RESOURCE_DOES_NOT_EXIST":
        raise InitError(f"experiment {name!r}: HTTP {status}: {reply.get('message', reply)}")
    status, reply = admin.call("POST", "/api/2.0/mlflow/experiments/create", {"name": name})
    if status == 200:
        print(f"created experiment {name!r} (id {reply['experiment_id']})")
        return str(reply["experiment_id"])
    if reply.get("error_code") == "RESOURCE_ALREADY_EXISTS":  # made meanwhile (a training driver)
        return ensure_experiment(admin, name)
    raise InitError(f"creating experiment {name!r}: HTTP {status}: {reply.get('message', reply)}")


def ensure_registered_model(admin: Api, name: str) -> None:
    status, reply = admin.call("GET", "/api/2.0/mlflow/registered-models/get", {"name": name})
    if status == 200:
        return
    if reply.get("error_code") != "RESOURCE_DOES_NOT_EXIST":
        raise InitError(f"registered model {name!r}: HTTP {status}: {reply.get('message', reply)}")
    status, reply = admin.call("POST", "/api/2.0/mlflow/registered-models/create", {"name": name})
    if status == 200:
        print(f"created registered model {name!r}")
    elif reply.get("error_code") != "RESOURCE_ALREADY_EXISTS":
        raise InitError(f"creating registered model {name!r}: HTTP {status}: {reply.get('message', reply)}")


def ensure_user(admin: Api, username: str, password: str) -> None:
    status, reply = admin.call("GET", "/api/2.0/mlflow/users/get", {"username": username})
    if status == 200:
        user = reply["user"]
        # Log in as the user: a password is reset only when the one given fails.
        own = Api(admin.base, username, password)
        if own.call("GET", "/api/2.0/mlflow/users/current")[0] == 401:
            admin.ok(
                "PATCH", "/api/2.0/mlflow/users/update-password", {"username": username, "password": password}
            )
            print(f"user {username!r}: password reset to the one given")
        if user.get("is_admin"):
            admin.ok("PATCH", "/api/2.0/mlflow/users/update-admin", {"username": username, "is_admin": False})
            print(f"user {username!r}: admin flag cleared")
        return
    if reply.get("error_code") != "RESOURCE_DOES_NOT_EXIST":
        raise InitError(f"user {username!r}: HTTP {status}: {reply.get('message', reply)}")
    admin.ok("POST", "/api/2.0/mlflow/users/create", {"username": username, "password": password})
    print(f"created user {username!r}")


def ensure_grant(admin: Api, username: str, resource_type: str, resource_id: str, permission: str) -> None:
    """``username`` holds exactly ``permission`` on the resource through its own grant."""
    what = {"username": username, "resource_type": resource_type, "resource_id": resource_id}
    grant = {**what, "permission": permission}
    status, reply = admin.call("POST", "/api/3.0/mlflow/users/permissions/grant", grant)
    if status == 200:
        print(f"granted {permission} on {resource_type} {resource_id!r} to {username!r}")
        return
    if reply.get("error_code") != "RESOURCE_ALREADY_EXISTS":
        raise InitError(f"grant {grant}: HTTP {status}: {reply.get('message', reply)}")
    current = admin.ok("GET", "/api/3.0/mlflow/users/permissions/get", what).get("permission")
    if current == permission:
        return
    # A grant at another level: replace it (grants have no update call).
    admin.ok("POST", "/api/3.0/mlflow/users/permissions/revoke", what)
    admin.ok("POST", "/api/3.0/mlflow/users/permissions/grant", grant)
    print(f"changed {username!r} on {resource_type} {resource_id!r}: {current} -> {permission}")


def names(value: str) -> list[str]:
    return [n.strip() for n in value.split(",") if n.strip()]


def main(env: dict[str, str]) -> int:
    required = [
        "MLFLOW_TRACKING_URI",
        "MLFLOW_AUTH_ADMIN_PASSWORD",
        "AIGC_MLFLOW_JOB_USERNAME",
        "AIGC_MLFLOW_JOB_PASSWORD",
        "AIGC_MLFLOW_SERVING_USERNAME",
        "AIGC_MLFLOW_SERVING_PASSWORD",
    ]
    missing = [k for k in required if not env.get(k)]
    if missing:
        print(f"init-users.py: missing {', '.join(missing)} in the environment", file=sys.stderr)
        return 2
    admin_name = env.get("MLFLOW_AUTH_ADMIN_USERNAME") or "admin"
    job, serving = env["AIGC_MLFLOW_JOB_USERNAME"], env["AIGC_MLFLOW_SERVING_USERNAME"]
    if len({admin_name, job, serving}) != 3:
        print("init-users.py: the admin, job and serving users need three different names", file=sys.stderr)
        return 2
    experiments = names(env.get("AIGC_MLFLOW_EXPERIMENTS", "aigc"))
    models = names(env.get("AIGC_MLFLOW_MODELS", "aigc-diffusion"))
    admin = Api(env["MLFLOW_TRACKING_URI"], admin_name, env["MLFLOW_AUTH_ADMIN_PASSWORD"])
    try:
        wait_for_server(admin, float(env.get("AIGC_MLFLOW_WAIT_S", "300")))
        experiment_ids = [ensure_experiment(admin, name) for name in experiments]
        for name in models:
            ensure_registered_model(admin, name)
        ensure_user(admin, job, env["AIGC_MLFLOW_JOB_PASSWORD"])
        ensure_user(admin, serving, env["AIGC_MLFLOW_SERVING_PASSWORD"])
        for experiment_id in experiment_ids:
            ensure_grant(admin, job, "experiment", experiment_id, "EDIT")
            ensure_grant(admin, serving, "experiment", experiment_id, "READ")
        for name in models:
            ensure_grant(admin, job, "registered_model", name, "EDIT")
            ensure_grant(admin, serving, "registered_model", name, "READ")
    except (InitError, OSError) as err:
        print(f"init-users.py: {err}", file=sys.stderr)
        return 1
    print(
        f"MLflow users ready: {job!r} EDIT, {serving!r} READ on experiments {experiments} and models {models}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(dict(os.environ)))

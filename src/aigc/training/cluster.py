"""Ray start-up for training jobs: join a cluster, or start an embedded one on loopback.

The facts this relies on (ray 2.60 on Linux, see ``docs/stack-pitfalls.md``):

- ``ray.init(_node_ip_address="127.0.0.1")`` is ignored on Linux: Ray binds to the machine's
  interface address unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` makes it treat the machine as a
  laptop-style single-node cluster, which stays on 127.0.0.1. Ray reads that variable once, when
  ``ray`` is first imported (``ray._private.ray_constants.ENABLE_RAY_CLUSTER``), and by the time
  ``init_ray`` runs the driver has usually imported ray already: the constant is re-read here.
- ``ray start`` turns token authentication on and writes ``~/.ray/auth_token``; a client sends the
  token only with ``RAY_AUTH_MODE=token`` in its environment, else joining fails.
"""

from __future__ import annotations

import os

from aigc.training.job import TrainError

# Environment the driver passes on to workers: fault injection and data recording for the tests,
# the project root, and MLflow's retry settings (so a dead tracking server never stalls a worker).
WORKER_ENV_KEYS = (
    "AIGC_FAULT_EXIT_AT_STEP",
    "AIGC_RECORD_KEYS_DIR",
    "AIGC_PROJECT_ROOT",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
    "MLFLOW_HTTP_REQUEST_TIMEOUT",
)


#: Ray's variable for the state API's address (ray/dashboard/utils.py), and the address the embedded
#: Ray's processes get: nothing listens on port 1, so a state query fails at once (see init_ray).
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"
NO_API_SERVER = "http://127.0.0.1:1"


def init_ray(address: str | None) -> None:
    """Join ``address`` (or ``RAY_ADDRESS``) or start an embedded local Ray on 127.0.0.1."""
    import ray

    if ray.is_initialized():
        return
    # Worker logs stay in Ray's session folder (/tmp/ray/session_latest/logs) so the terminal shows
    # one progress line per job, not one stream per worker; failures still carry each rank's
    # traceback in the error. AIGC_WORKER_LOGS=1 streams them to the terminal.
    to_driver = os.environ.get("AIGC_WORKER_LOGS", "0") not in ("", "0", "false")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        try:
            ray.init(address=address, log_to_driver=to_driver)
        except ConnectionError as err:
            hint = ""
            if os.environ.get("RAY_AUTH_MODE") != "token":
                hint = (
                    " If the cluster uses token authentication (the default of `ray start`),"
                    " set RAY_AUTH_MODE=token."
                )
            raise TrainError(f"cannot join the Ray cluster at {address}: {err}.{hint}") from err
        return
    # Loopback (see the module doc): the variable for the processes Ray starts, the constant for
    # this one, whose ray was imported before the variable was set.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    # Ray Train's PlacementGroupCleaner asks the state API whether the run's controller is alive. With
    # no address set, the state client finds "the" cluster through /tmp/ray/ray_current_cluster,
    # which `ray start` writes and nothing removes when that cluster is killed: a stale one made every
    # query wait 40 s for a dead GCS, and every job end wait 12 s for the cleaner. A live one is
    # another cluster, whose dashboard does not know this run's controller. The embedded Ray runs no
    # dashboard, so its processes get an API address that refuses at once.
    os.environ.setdefault(API_SERVER_ENV, NO_API_SERVER)
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] not in ("0", "false")
    # address="local": always a new embedded instance, never a cluster that `ray start` left behind.
    ray.init(address="local", include_dashboard=False, log_to_driver=to_driver, configure_logging=False)


def worker_env() -> dict[str, str]:
    """The variables of :data:`WORKER_ENV_KEYS` set in the driver's environment."""
    return {k: os.environ[k] for k in WORKER_ENV_KEYS if k in os.environ}

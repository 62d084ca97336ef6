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
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import warnings
from dataclasses import dataclass
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


def start_serving(cfg: ServeConfig) -> Serving:
    """Resolve the reference (fail fast), start Ray and Serve, deploy and wait until it serves.

    Raises ``TrackingUnavailable`` (a ``RuntimeError``) for a registry that does not answer,
    ``RegistryError`` for a reference that names nothing, ``ClusterError`` for a Ray cluster that
    cannot be joined, and ``RuntimeError`` when Serve cannot start or deploy.
    """
    from aigc.registry.versions import client_for, parse_ref, resolve_version
    from aigc.tracking import ensure_tracking_store, resolve_tracking_uri

    uri = resolve_tracking_uri(cfg.tracking_uri)  # absolute: replicas run in Ray's session folder
    cfg = cfg.model_copy(update={"tracking_uri": uri})
    ref = parse_ref(cfg.ref)
    # In the driver too: a dead tracking server answers at once instead of after minutes of retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    ensure_tracking_store(uri)  # TrackingUnavailable naming the URI when a server does not answer
    resolve_version(client_for(uri), ref)  # RegistryError naming what exists, before Ray starts

    embedded = not (cfg.ray_address or os.environ.get("RAY_ADDRESS"))
    if embedded:
        _embedded_ray_environment()
    import ray
    from ray import serve

    from aigc.cluster import init_ray
    from aigc.serving.app import build_app

    init_ray(cfg.ray_address)
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
        _shutdown(ref.name, embedded)
        ray.shutdown()
        raise
    shown_host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    url = f"http://{shown_host}:{cfg.port}"
    return Serving(cfg, ref.name, url, health, embedded)


def _embedded_ray_environment() -> None:
    """Environment of the embedded Ray, set before this process imports ``ray``.

    - ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` keeps Ray on 127.0.0.1 on Linux (it ignores
      ``_node_ip_address="127.0.0.1"`` and binds the interface address otherwise). Ray reads it once,
      when ``ray`` is imported (``ray._private.ray_constants``), so setting it later, e.g. right
      before ``ray.init``, does nothing; Ray's processes inherit it from this one.
    - ``RAY_worker_niceness=0``: the raylet starts worker processes, our replicas among them, at
      nice 15 so that tasks never starve Ray's own processes; a replica at nice 15 loses the CPU to
      any other busy process on the machine (a 20-step diffusion call ran 2x slower next to one,
      2 cores). Serving is the point of this Ray instance, so its workers run at normal priority.
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


def stop_serving(serving: Serving) -> None:
    """Remove the application, then Serve and Ray where this process started them."""
    import ray

    _shutdown(serving.app_name, serving.embedded)
    ray.shutdown()


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

"""The configuration of ``aigc serve``, importable without Ray (the CLI must set Ray's environment
before anything imports ``ray``: see ``aigc.serving.server``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from aigc.config import StrictModel
from aigc.serving.limits import RequestLimits

#: How long one registry request of the alias-following thread may take. MLflow's client retries an
#: unreachable tracking server for minutes by default; the replica sets
#: MLFLOW_HTTP_REQUEST_MAX_RETRIES=0 so a dead server costs one timeout per poll instead.
REGISTRY_TIMEOUT_S = 5


class ServeConfig(StrictModel):
    """Everything ``aigc serve`` sets; the replicas get it as JSON."""

    ref: str = Field(description="model reference, e.g. aigc-diffusion@production")
    tracking_uri: str | None = Field(
        None, description="MLflow store (registry); absolute, resolved by the driver"
    )
    host: str = Field("127.0.0.1", description="address to bind (0.0.0.0 inside a pod)")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port")
    ray_address: str | None = Field(None, description="join this Ray cluster")
    # Measured by benchmarks/serving.py (docs/serving.md, Performance): besides the model, a request
    # costs about 11 ms behind Serve's Python proxy on the 2-core VM, about 3 ms behind HAProxy.
    ingress: Literal["proxy", "haproxy"] = Field(
        "proxy",
        description="the embedded Ray's HTTP ingress: Serve's Python proxy (Ray's default), or "
        "HAProxy in front of replicas that serve HTTP themselves (Ray's high-throughput mode; its "
        "stats and metrics listeners bind every interface: docs/serving.md)",
    )
    replicas: int = Field(1, ge=1, description="Serve replicas")
    # Replicas default to a whole CPU in Ray Serve; on a 2-core machine half a CPU each leaves room
    # for the proxy, the controller and a second replica.
    cpus_per_replica: float = Field(0.5, gt=0, description="Ray CPUs per replica")
    threads_per_replica: int = Field(1, ge=1, description="torch threads per replica")
    poll_interval_s: float = Field(2.0, ge=0, description="seconds between alias polls (0: never)")
    max_batch_size: int = Field(8, ge=1, description="requests per dynamic batch")
    # 0: a request that finds the replica idle goes to the model at once. Batches still form: the model
    # queue (aigc.serving.batching) merges every request that arrives while the model is busy and
    # waits briefly for the clients it just answered, so a window here only adds latency at low load.
    batch_wait_timeout_s: float = Field(0.0, ge=0, description="seconds a batch waits to fill")
    max_ongoing_requests: int = Field(16, ge=1, description="requests a replica holds at once")
    max_queued_requests: int = Field(64, ge=1, description="requests queued beyond those (503 above)")
    limits: RequestLimits = Field(default_factory=RequestLimits)

    @model_validator(mode="after")
    def _room_for_a_batch(self) -> ServeConfig:
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(
                f"max_ongoing_requests ({self.max_ongoing_requests}) must be >= max_batch_size "
                f"({self.max_batch_size}), or batches never fill"
            )
        return self


#: Serve's application builder for ``aigc serve``'s application (``serve run``, ``serve deploy``,
#: a KubeRay RayService's ``serveConfigV2``).
APP_BUILDER = "aigc.serving.app:app_builder"
#: ServeConfig fields that are not the builder's args: the cluster's Serve settings (host, port go to
#: ``http_options``; the ingress is the cluster's environment), the cluster to join, and the tracking
#: URI when unset (a pod's MLFLOW_TRACKING_URI).
_NOT_ARGS = ("host", "port", "ray_address", "ingress")


def deploy_config(cfg: ServeConfig) -> dict:
    """The Ray Serve config file that runs ``cfg``'s application on a cluster that already runs Ray:
    ``serve deploy``'s file, or a RayService's ``serveConfigV2`` (what ``aigc serve --print-config``
    prints). ``app_builder`` turns its ``args`` back into ``cfg``."""
    from aigc.registry.versions import parse_ref

    exclude = {*_NOT_ARGS, *(("tracking_uri",) if cfg.tracking_uri is None else ())}
    return {
        "http_options": {"host": cfg.host, "port": cfg.port},
        "applications": [
            {
                "name": parse_ref(cfg.ref).name,
                "route_prefix": "/",
                "import_path": APP_BUILDER,
                "args": cfg.model_dump(mode="json", exclude=exclude),
            }
        ],
    }


def replica_env(cfg: ServeConfig) -> dict[str, str]:
    """Environment of each replica process (the deployment's ``runtime_env``)."""
    return {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(REGISTRY_TIMEOUT_S),
        # torch reads it at import; Ray would set it from the CPU share (1 for a fraction).
        "OMP_NUM_THREADS": str(cfg.threads_per_replica),
    }

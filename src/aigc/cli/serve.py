"""``aigc serve``: a registered model over HTTP with Ray Serve, following its alias."""

from __future__ import annotations

import typer

from aigc.cli.common import fail, field_option
from aigc.serving.config import ServeConfig
from aigc.serving.limits import RequestLimits


def register(app: typer.Typer) -> None:
    @app.command()
    def serve(
        ref: str = typer.Argument(..., help=ServeConfig.model_fields["ref"].description),
        host: str = field_option(ServeConfig, "host", "--host"),
        port: int = field_option(ServeConfig, "port", "--port"),
        replicas: int = field_option(ServeConfig, "replicas", "--replicas"),
        cpus_per_replica: float = field_option(ServeConfig, "cpus_per_replica", "--cpus-per-replica"),
        threads_per_replica: int = field_option(ServeConfig, "threads_per_replica", "--threads-per-replica"),
        ray_address: str | None = field_option(ServeConfig, "ray_address", "--ray-address"),
        ingress: str = field_option(ServeConfig, "ingress", "--ingress"),
        tracking_uri: str | None = field_option(ServeConfig, "tracking_uri", "--tracking-uri"),
        poll_interval: float = field_option(ServeConfig, "poll_interval_s", "--poll-interval"),
        max_batch_size: int = field_option(ServeConfig, "max_batch_size", "--max-batch-size"),
        batch_wait: float = field_option(ServeConfig, "batch_wait_timeout_s", "--batch-wait"),
        max_ongoing: int = field_option(ServeConfig, "max_ongoing_requests", "--max-ongoing-requests"),
        max_queued: int = field_option(ServeConfig, "max_queued_requests", "--max-queued-requests"),
        max_num_samples: int = field_option(RequestLimits, "max_num_samples", "--max-num-samples"),
        max_prompt_chars: int = field_option(RequestLimits, "max_prompt_chars", "--max-prompt-chars"),
        max_steps: int = field_option(RequestLimits, "max_steps", "--max-steps"),
        max_body_bytes: int = field_option(RequestLimits, "max_body_bytes", "--max-body-bytes"),
        max_image_bytes: int = field_option(RequestLimits, "max_image_bytes", "--max-image-bytes"),
        max_frames: int = field_option(RequestLimits, "max_frames", "--max-frames"),
        print_config: bool = typer.Option(
            False,
            "--print-config",
            help="print the Ray Serve config of this application (serve deploy, a RayService's "
            "serveConfigV2) and exit; starts nothing",
        ),
    ) -> None:
        """Serve a registered model: POST /generate, GET /healthz, GET /stats. Follows the alias
        (a promotion is picked up within --poll-interval, with no failed request). Stop with
        Ctrl-C or SIGTERM. With --print-config, print the same application as a Ray Serve config
        for a cluster (a KubeRay RayService) instead."""
        from pydantic import ValidationError

        from aigc.cluster import ClusterError
        from aigc.registry.versions import RegistryError
        from aigc.serving.server import start_serving, stop_serving, wait_for_signal

        try:
            cfg = ServeConfig(
                ref=ref,
                tracking_uri=tracking_uri,
                host=host,
                port=port,
                ray_address=ray_address,
                ingress=ingress,
                replicas=replicas,
                cpus_per_replica=cpus_per_replica,
                threads_per_replica=threads_per_replica,
                poll_interval_s=poll_interval,
                max_batch_size=max_batch_size,
                batch_wait_timeout_s=batch_wait,
                max_ongoing_requests=max_ongoing,
                max_queued_requests=max_queued,
                limits=RequestLimits(
                    max_num_samples=max_num_samples,
                    max_prompt_chars=max_prompt_chars,
                    max_steps=max_steps,
                    max_body_bytes=max_body_bytes,
                    max_image_bytes=max_image_bytes,
                    max_frames=max_frames,
                ),
            )
        except ValidationError as err:
            fail("; ".join(_problem(e) for e in err.errors()))
        if print_config:
            import yaml

            from aigc.serving.config import deploy_config

            try:
                config = deploy_config(cfg)
            except RegistryError as err:
                fail(str(err))
            typer.echo(yaml.safe_dump(config, sort_keys=False), nl=False)
            return
        typer.echo(f"starting Ray Serve for {ref} ...")
        try:
            serving = start_serving(cfg)
        except (RegistryError, ClusterError, RuntimeError) as err:
            fail(str(err))
        h = serving.health
        how = f"alias {h['alias']}, followed" if h.get("alias") else "pinned version, not followed"
        typer.echo(f"model      {h['model']} version {h['version']} ({how})")
        typer.echo(f"serving    {serving.url}  (POST /generate, GET /healthz, GET /stats)")
        polling = f"polling the alias every {cfg.poll_interval_s:g} s" if h.get("alias") else "not polling"
        typer.echo(f"replicas   {cfg.replicas}, {polling}")
        typer.echo("stop with Ctrl-C or SIGTERM")
        signum = wait_for_signal()
        typer.echo(f"signal {signum}: shutting down")
        stop_serving(serving)
        typer.echo("stopped")


def _problem(error: dict) -> str:
    """One pydantic error as ``field: message`` (the fields are named like the flags)."""
    where = ".".join(map(str, error["loc"]))
    message = error["msg"].removeprefix("Value error, ")
    return f"{where}: {message}" if where else message

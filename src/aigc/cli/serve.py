"""``aigc serve``: a registered model over HTTP with Ray Serve, following its alias."""

from __future__ import annotations

import typer

from aigc.cli.common import fail


def register(app: typer.Typer) -> None:
    @app.command()
    def serve(
        ref: str = typer.Argument(..., help="model reference, e.g. aigc-diffusion@production"),
        host: str = typer.Option("127.0.0.1", "--host", help="address to bind (0.0.0.0 inside a pod)"),
        port: int = typer.Option(8000, "--port", help="HTTP port"),
        replicas: int = typer.Option(1, "--replicas", help="Serve replicas"),
        cpus_per_replica: float = typer.Option(0.5, "--cpus-per-replica", help="Ray CPUs per replica"),
        threads_per_replica: int = typer.Option(1, "--threads-per-replica", help="torch threads per replica"),
        ray_address: str | None = typer.Option(None, "--ray-address", help="join this Ray cluster"),
        tracking_uri: str | None = typer.Option(None, "--tracking-uri", help="MLflow store (registry)"),
        poll_interval: float = typer.Option(2.0, "--poll-interval", help="seconds between alias polls"),
        max_batch_size: int = typer.Option(8, "--max-batch-size", help="requests per dynamic batch"),
        batch_wait: float = typer.Option(0.01, "--batch-wait", help="seconds a batch waits to fill"),
        max_ongoing: int = typer.Option(16, "--max-ongoing-requests", help="requests a replica holds"),
        max_queued: int = typer.Option(64, "--max-queued-requests", help="queued beyond those; 503 above"),
        max_num_samples: int = typer.Option(16, "--max-num-samples", help="limit: images per request"),
        max_prompt_chars: int = typer.Option(256, "--max-prompt-chars", help="limit: prompt length"),
        max_steps: int = typer.Option(200, "--max-steps", help="limit: sampling steps (diffusion)"),
        max_body_bytes: int = typer.Option(16384, "--max-body-bytes", help="limit: request body (413)"),
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
        from aigc.registry.store import RegistryError
        from aigc.serving.config import ServeConfig
        from aigc.serving.limits import RequestLimits
        from aigc.serving.server import start_serving, stop_serving, wait_for_signal

        try:
            cfg = ServeConfig(
                ref=ref,
                tracking_uri=tracking_uri,
                host=host,
                port=port,
                ray_address=ray_address,
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

"""``aigc runs`` (recent training runs as a table) and ``aigc ui`` (the MLflow UI on the local store).

mlflow takes seconds to import, so the tracking modules are imported inside the commands, and
``aigc ui`` never imports mlflow at all: ``aigc --help`` and the UI start quickly.
"""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the ``runs`` and ``ui`` commands to ``app``."""

    @app.command()
    def runs(
        experiment: str = typer.Option(
            None, "--experiment", "-e", help="Only this experiment (default: all)."
        ),
        max_results: int = typer.Option(
            20, "--max-results", "-n", min=1, help="How many runs, newest first."
        ),
        uri: str = typer.Option(
            None, "--uri", help="Tracking URI (default: MLFLOW_TRACKING_URI, else mlflow/)."
        ),
    ) -> None:
        """List recent training runs: status, family, duration and the main metrics."""
        from aigc.tracking import TrackingUnavailable, format_runs_table, list_runs

        try:
            found = list_runs(uri, experiment=experiment, max_results=max_results)
        except (TrackingUnavailable, ValueError) as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(1) from e
        if not found:
            typer.echo("no runs yet")
            return
        typer.echo(format_runs_table(found))

    @app.command()
    def ui(
        port: int = typer.Option(5000, "--port", "-p", help="Port to listen on."),
        host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind; 0.0.0.0 only inside a pod."),
        uri: str = typer.Option(
            None, "--uri", help="Tracking URI (default: MLFLOW_TRACKING_URI, else mlflow/)."
        ),
    ) -> None:
        """Start the MLflow UI over the local tracking store (Ctrl-C stops it)."""
        from aigc.tracking.backend import is_local_store, resolve_tracking_uri
        from aigc.tracking.server import UI_VIEW, exec_mlflow_server, ui_url

        resolved = resolve_tracking_uri(uri)
        if not is_local_store(resolved):
            typer.echo(
                f"the tracking store is a server already: open {resolved.rstrip('/')}/#/experiments?{UI_VIEW}"
            )
            return
        typer.echo(f"MLflow UI for {resolved}: {ui_url('experiments', host, port)}", err=True)
        exec_mlflow_server(resolved, host=host, port=port)

"""``aigc train``: one training job on the embedded Ray or a cluster, tracked in MLflow."""

from __future__ import annotations

from pathlib import Path

import typer

from aigc.cli.common import fail


def register(app: typer.Typer) -> None:
    @app.command()
    def train(
        config: Path | None = typer.Argument(None, help="run config, e.g. models/diffusion.yaml"),
        set_: list[str] = typer.Option([], "--set", help="dotted override KEY=VALUE (repeatable)"),
        workers: int | None = typer.Option(None, "--workers", help="Ray Train workers (scaling.num_workers)"),
        gpus_per_worker: float | None = typer.Option(None, "--gpus-per-worker", help="GPUs per worker"),
        ray_address: str | None = typer.Option(None, "--ray-address", help="join this Ray cluster"),
        name: str | None = typer.Option(None, "--name", help="run name (must be new)"),
        resume: str | None = typer.Option(None, "--resume", help="continue the run with this name"),
        metrics_out: Path | None = typer.Option(None, "--metrics-out", help="write eval/* figures as JSON"),
        evaluate: bool = typer.Option(True, "--eval/--no-eval", help="evaluate the final checkpoint"),
        eval_samples: int = typer.Option(500, "--eval-samples", help="samples for the final evaluation"),
        register: bool = typer.Option(
            True, "--register/--no-register", help="register the final model as aigc-<family>@candidate"
        ),
    ) -> None:
        """Train a model family with Ray Train; every run lands in MLflow."""
        from aigc.config import ConfigError
        from aigc.tracking import TrackingUnavailable
        from aigc.training import TrainError
        from aigc.training import train as run_train

        if config is None and resume is None:
            fail("give a config (e.g. models/diffusion.yaml) or --resume NAME")
        try:
            result = run_train(
                config,
                set_,
                workers=workers,
                gpus_per_worker=gpus_per_worker,
                ray_address=ray_address,
                name=name,
                resume=resume,
                metrics_out=metrics_out,
                evaluate=evaluate,
                eval_samples=eval_samples,
                register=register,
            )
        except (ConfigError, TrainError, TrackingUnavailable) as err:
            fail(str(err))
        except KeyboardInterrupt:
            fail("interrupted: the MLflow run is marked KILLED; continue with --resume", code=130)
        print_summary(result)


def print_summary(r) -> None:
    typer.echo("")
    typer.echo(f"run        {r.name}  ({r.status}, {r.global_step} steps, {r.seconds:.0f} s)")
    typer.echo(f"mlflow     run {r.run_id} in {r.tracking_uri}")
    typer.echo(
        f"           open it: aigc ui   then   http://127.0.0.1:5000/#/experiments/{r.experiment_id}"
        f"/runs/{r.run_id}"
    )
    for k, v in sorted(r.metrics.items()):
        typer.echo(f"  {k:<24} {v:.4f}")
    for k, v in sorted(r.eval.items()):
        if k.startswith("eval/"):
            typer.echo(f"  {k:<24} {v:.4f}")
    typer.echo(f"checkpoint {r.checkpoint}")
    typer.echo(f"run folder {r.run_dir}")
    if r.sample_grid:
        typer.echo(f"samples    {r.sample_grid}")
    if r.registered:
        name, version = r.registered.split("/")
        typer.echo(f"registered {name} v{version} as candidate: aigc promote {name}")

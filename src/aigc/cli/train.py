"""``aigc train``: one training job on the embedded Ray or a cluster, tracked in MLflow."""

from __future__ import annotations

from pathlib import Path

import typer

from aigc.cli.common import declared_field, fail, field_option
from aigc.contract import eval_figures
from aigc.training.request import TrainRequest


def register(app: typer.Typer) -> None:
    @app.command()
    def train(
        config: Path | None = typer.Argument(None, help=declared_field(TrainRequest, "config")[1]),
        overrides: list[str] = field_option(TrainRequest, "overrides", "--set"),
        workers: str | None = field_option(TrainRequest, "workers", "--workers", metavar="N|MIN-MAX"),
        gpus_per_worker: float | None = field_option(TrainRequest, "gpus_per_worker", "--gpus-per-worker"),
        ray_address: str | None = field_option(TrainRequest, "ray_address", "--ray-address"),
        name: str | None = field_option(TrainRequest, "name", "--name"),
        resume: str | None = field_option(TrainRequest, "resume", "--resume"),
        params: Path | None = typer.Option(
            None,
            "--params",
            help="YAML whose train.<config> section overrides the config, <config> being its file name "
            "without .yaml (models/latent-diffusion.yaml: train.latent-diffusion; dvc.yaml)",
        ),
        metrics_out: Path | None = field_option(TrainRequest, "metrics_out", "--metrics-out"),
        loss_out: Path | None = typer.Option(
            None, "--loss-out", help="write the train/loss curve as step,value CSV (dvc plots)"
        ),
        evaluate: bool = field_option(TrainRequest, "evaluate", "--eval/--no-eval"),
        eval_samples: int = field_option(TrainRequest, "eval_samples", "--eval-samples"),
        register: bool = field_option(TrainRequest, "register", "--register/--no-register"),
        allow_modified_data: bool = field_option(
            TrainRequest, "allow_modified_data", "--allow-modified-data"
        ),
        verify_data: bool = field_option(TrainRequest, "verify_data", "--verify-data"),
        parent_run_id: str | None = field_option(TrainRequest, "parent_run_id", "--parent-run-id"),
        init_from: str | None = field_option(TrainRequest, "init_from", "--init-from", metavar="REF"),
    ) -> None:
        """Train a model family with Ray Train; every run lands in MLflow."""
        from aigc.config import ConfigError
        from aigc.data.manifest import DatasetError
        from aigc.tracking import TrackingUnavailable
        from aigc.training import TrainError
        from aigc.workflows.train import train_and_register

        if config is None and resume is None:
            fail("give a config (e.g. models/diffusion.yaml) or --resume NAME")
        try:
            if params is not None:
                if config is None:
                    fail("--params needs the config it overrides, e.g. models/diffusion.yaml")
                from aigc.workflows.pipeline import train_overrides

                # params.yaml first, so a --set on the command line still wins.
                overrides = train_overrides(params, config) + list(overrides)
            request = TrainRequest(
                config=config,
                overrides=overrides,
                workers=workers,
                gpus_per_worker=gpus_per_worker,
                ray_address=ray_address,
                name=name,
                resume=resume,
                metrics_out=metrics_out,
                evaluate=evaluate,
                eval_samples=eval_samples,
                register=register,
                allow_modified_data=allow_modified_data,
                verify_data=verify_data,
                parent_run_id=parent_run_id,
                init_from=init_from,
            )
            result = train_and_register(request)
        except (ConfigError, TrainError, TrackingUnavailable, DatasetError) as err:
            # DatasetError: a shard that fails while the run is open (its sample prompts, the final
            # evaluation); the run is already marked FAILED with the message in aigc.error.
            fail(str(err))
        except KeyboardInterrupt:
            fail("interrupted: the MLflow run is marked KILLED; continue with --resume", code=130)
        if loss_out is not None:
            from aigc.workflows.pipeline import write_loss_curve

            write_loss_curve(result.tracking_uri, result.run_id, loss_out)
        print_summary(result)


def print_summary(r) -> None:
    typer.echo("")
    typer.echo(f"run        {r.name}  ({r.status}, {r.global_step} steps, {r.seconds:.0f} s)")
    typer.echo(f"mlflow     run {r.run_id} in {r.tracking_uri}")
    from aigc.tracking.server import ui_url

    link = ui_url(f"experiments/{r.experiment_id}/runs/{r.run_id}")
    typer.echo(f"           open it: aigc ui   then   {link}")
    for k, v in sorted(r.metrics.items()):
        typer.echo(f"  {k:<24} {v:.4f}")
    for k, v in sorted(eval_figures(r.eval).items()):
        typer.echo(f"  {k:<24} {v:.4f}")
    if r.bad_samples:
        typer.echo(
            f"data       skipped {r.bad_samples} unreadable train samples in an epoch "
            f"({r.bad_fraction:.2%}); worst shards: {r.bad_shards}"
        )
    if r.data_modified:
        typer.echo(f"data       differs from its manifest (allowed): {'; '.join(r.data_modified)}")
    chosen = ""
    if r.checkpoint and r.checkpoint_step is not None and r.checkpoint_step != r.global_step:
        chosen = f"  (the best evaluated, step {r.checkpoint_step} of {r.global_step})"
    typer.echo(f"checkpoint {r.checkpoint}{chosen}")
    typer.echo(f"run folder {r.run_dir}")
    if r.sample_grid:
        typer.echo(f"samples    {r.sample_grid}")
    if r.registered:
        name, version = r.registered.split("/")
        typer.echo(f"registered {name} v{version} as candidate: aigc promote {name}")

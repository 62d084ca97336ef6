"""``aigc sweep``: a hyperparameter search on Ray Tune, one ``aigc train`` job per trial."""

from __future__ import annotations

from pathlib import Path

import typer

from aigc.cli.common import declared_field, fail


def _help(name: str) -> str | None:
    from aigc.workflows.sweep import SweepFile

    return declared_field(SweepFile, name)[1]


def register(app: typer.Typer) -> None:
    @app.command()
    def sweep(
        config: Path | None = typer.Argument(None, help="run config, e.g. models/diffusion.yaml"),
        params: list[str] = typer.Option(
            [],
            "--param",
            metavar="KEY=SPEC",
            help="a searched config key (repeatable): uniform:LOW:HIGH, loguniform:LOW:HIGH, "
            "randint:LOW:HIGH, choice:A,B,..., grid:A,B,...",
        ),
        trials: int | None = typer.Option(None, "--trials", help="trials to draw (default 4)"),
        concurrent: int | None = typer.Option(None, "--concurrent", help="trials at a time (default 1)"),
        scheduler: str | None = typer.Option(None, "--scheduler", help="fifo (default) or asha"),
        metric: str | None = typer.Option(None, "--metric", help=_help("metric")),
        mode: str | None = typer.Option(None, "--mode", help="min or max; default the metric's own"),
        name: str | None = typer.Option(None, "--name", help=_help("name")),
        overrides: list[str] = typer.Option(
            [], "--set", metavar="KEY=VALUE", help="override for every trial"
        ),
        seed: int | None = typer.Option(None, "--seed", help=_help("seed")),
        grace_period: int | None = typer.Option(None, "--grace-period", help=_help("grace_period")),
        workers: int | None = typer.Option(None, "--workers", help=_help("workers")),
        evaluate: bool | None = typer.Option(
            None, "--eval/--no-eval", help="final evaluation of each trial (default off)"
        ),
        eval_samples: int | None = typer.Option(None, "--eval-samples", help=_help("eval_samples")),
        register_best: bool | None = typer.Option(
            None, "--register-best/--no-register-best", help="register the best trial's run as candidate"
        ),
        ray_address: str | None = typer.Option(None, "--ray-address", help="join this Ray cluster"),
        file: Path | None = typer.Option(
            None, "--file", help="a YAML sweep file (the same keys as the flags)"
        ),
        resume: str | None = typer.Option(None, "--resume", help="continue the sweep with this name"),
    ) -> None:
        """Search hyperparameters on Ray Tune; each trial is an `aigc train` job, nested in MLflow under
        the sweep's run."""
        from aigc.config import ConfigError, validate
        from aigc.data.manifest import DatasetError
        from aigc.tracking import TrackingUnavailable
        from aigc.training import TrainError
        from aigc.workflows.sweep import (
            SweepError,
            SweepFile,
            format_table,
            load_sweep_file,
            parse_params,
            run_sweep,
        )

        flags = {
            "trials": trials,
            "concurrent": concurrent,
            "scheduler": scheduler,
            "metric": metric,
            "mode": mode,
            "name": name,
            "seed": seed,
            "grace_period": grace_period,
            "workers": workers,
            "evaluate": evaluate,
            "eval_samples": eval_samples,
            "register_best": register_best,
            "ray_address": ray_address,
        }
        try:
            if resume is not None:
                if config is not None or params or file is not None:
                    fail(
                        "--resume NAME continues a sweep as it was planned: give no config, --param or --file"
                    )
                result = run_sweep(
                    resume=resume, storage_overrides=overrides, register_best=register_best, say=typer.echo
                )
            else:
                if file is not None:
                    if config is not None:
                        flags["config"] = str(config)
                    spec = load_sweep_file(file, params=params, set=overrides, **flags)
                else:
                    if config is None:
                        fail("give a config (e.g. models/diffusion.yaml) and --param, or --file sweep.yaml")
                    data = {k: v for k, v in flags.items() if v is not None}
                    data |= {"config": str(config), "set": overrides}
                    data["params"] = {s.key: s.text for s in parse_params(params)}
                    spec = validate(SweepFile, data)
                result = run_sweep(spec, say=typer.echo)
        except (ConfigError, SweepError, TrainError, TrackingUnavailable, DatasetError) as err:
            fail(str(err))
        except KeyboardInterrupt:
            fail(
                "interrupted: the sweep's runs are marked KILLED; continue with aigc sweep --resume NAME",
                code=130,
            )
        typer.echo("")
        typer.echo(format_table(result))
        from aigc.tracking.server import ui_url

        typer.echo(f"sweep      {result.name}  ({len(result.trials)} trials, {result.seconds:.0f} s)")
        typer.echo(f"mlflow     parent run {result.parent_run_id} in {result.tracking_uri}")
        link = ui_url(f"experiments/{result.experiment_id}/runs/{result.parent_run_id}")
        typer.echo(f"           open it: aigc ui   then   {link}")
        if result.registered:
            model, version = result.registered.split("/")
            typer.echo(f"registered {model} v{version} as candidate: aigc promote {model}")

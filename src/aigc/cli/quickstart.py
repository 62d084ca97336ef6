"""``aigc quickstart``: data -> evaluator -> train -> register -> promote -> grid, on the defaults."""

from __future__ import annotations

import typer

from aigc.cli.common import fail
from aigc.contract import DEFAULT_EVAL_SAMPLES


def register(app: typer.Typer) -> None:
    @app.command()
    def quickstart(
        family: str = typer.Option("diffusion", "--family", help="diffusion | gan | vae | autoregressive"),
        steps: int | None = typer.Option(None, "--steps", min=1, help="override trainer.max_steps"),
        workers: int = typer.Option(2, "--workers", min=1, help="Ray Train workers"),
        eval_samples: int = typer.Option(
            DEFAULT_EVAL_SAMPLES, "--eval-samples", min=2, help="samples for the evaluation"
        ),
        set_: list[str] = typer.Option([], "--set", help="config override KEY=VALUE (repeatable)"),
        train: bool = typer.Option(True, "--train/--no-train", help="--no-train: stop after the data"),
        data: str = typer.Option(
            "digits",
            "--data",
            help="digits: 8x8 grey, models/FAMILY.yaml | emoji: OpenMoji 32x32 RGB, models/FAMILY-rgb32.yaml",
        ),
    ) -> None:
        """Build and verify the shards (digits, or emoji with --data emoji), train FAMILY on the
        embedded Ray, evaluate it, register it, promote it through the gate and draw one grid row
        per prompt. A second run reuses what is already built and says so."""
        from aigc import project_root
        from aigc.config import FAMILIES, ConfigError
        from aigc.registry.versions import RegistryError
        from aigc.tracking import TrackingUnavailable
        from aigc.tracking.server import ui_url
        from aigc.training import TrainError
        from aigc.workflows.quickstart import QUICKSTART_DATA, next_commands, prepare_data, quickstart

        if family == "autoencoder":  # the latent stage, not a text-to-image family
            fail("--family autoencoder: not a quickstart family; aigc train models/autoencoder-kl.yaml")
        if family == "sd":  # fine-tunes a pretrained pipeline folder: nothing to start from here
            fail("--family sd: not a quickstart family; it needs a diffusers pipeline (docs/diffusers.md)")
        if family not in FAMILIES:
            allowed = [f for f in FAMILIES if f not in ("autoencoder", "sd")]
            fail(f"--family {family!r}: allowed: {', '.join(allowed)}")
        if data not in QUICKSTART_DATA:
            fail(f"--data {data!r}: allowed: {', '.join(QUICKSTART_DATA)}")
        overrides = [*set_, *([f"trainer.max_steps={steps}"] if steps is not None else [])]
        try:
            if not train:
                prepare_data(project_root(), echo=typer.echo, data=data)
                return
            r = quickstart(
                project_root(),
                family,
                workers=workers,
                overrides=overrides,
                eval_samples=eval_samples,
                echo=typer.echo,
                data=data,
            )
        except (ConfigError, TrainError, TrackingUnavailable, RegistryError, ValueError) as err:
            fail(str(err), code=1)  # DatasetError is a ValueError
        except KeyboardInterrupt:
            fail("interrupted: a started run is marked KILLED; run aigc quickstart again", code=130)
        typer.echo("")
        typer.echo(f"data       {r.dataset}  (version {r.data_version})")
        typer.echo(f"run        {r.run_name}  ({r.run_id}) in {r.tracking_uri}")
        figures = ", ".join(f"{k.removeprefix('eval/')} {v:.4g}" for k, v in sorted(r.eval.items()))
        typer.echo(f"evaluation {figures}")
        verdict = "promoted" if r.promoted else f"not promoted ({r.gate})"
        prod = f"production is v{r.production}" if r.production else "no production version"
        typer.echo(f"model      {r.model} v{r.version}, {verdict}; {prod}")
        typer.echo(f"samples    {r.grid}")
        typer.echo(
            "took       "
            + ", ".join(f"{t.name} {t.seconds:.0f} s" + (" (reused)" if t.reused else "") for t in r.steps)
        )
        typer.echo("")
        typer.echo("next:")
        for line in next_commands(r):
            typer.echo(f"  {line}")
        typer.echo(f"  the run in the UI: {ui_url(f'experiments/{r.experiment_id}/runs/{r.run_id}')}")

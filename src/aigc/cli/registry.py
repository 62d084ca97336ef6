"""``aigc register | promote | rollback | models | lineage | generate``: the model registry."""

from __future__ import annotations

from pathlib import Path

import typer

from aigc.cli.common import fail


def _say(message: str) -> None:
    typer.echo(message, err=True)


def register(app: typer.Typer) -> None:
    tracking = typer.Option(
        None, "--tracking-uri", help="MLflow store; default MLFLOW_TRACKING_URI or mlflow/"
    )

    @app.command("register")
    def register_cmd(
        run: str = typer.Argument(
            ..., help="run id or name (aigc runs lists them), or the --metrics-out JSON of aigc train"
        ),
        then_promote: bool = typer.Option(
            False, "--promote", help="then promote it through the gate (a refusal is reported, exit 0)"
        ),
        params: Path | None = typer.Option(
            None, "--params", help="YAML whose register: section sets the --promote gate (dvc.yaml)"
        ),
        json_out: Path | None = typer.Option(None, "--json", help="write the version and decision as JSON"),
        tracking_uri: str | None = tracking,
    ) -> None:
        """Export a finished run and register it as a new `candidate` version of aigc-<family>."""
        from aigc.config import ConfigError, validate
        from aigc.registry.gate import GateConfig, promote
        from aigc.registry.register import register_run
        from aigc.registry.versions import RegistryError

        try:
            if run.endswith(".json") and Path(run).is_file():
                from aigc.workflows.pipeline import run_of

                run = run_of(run)
            gate = None
            if then_promote and params is not None:
                from aigc.workflows.pipeline import params_section

                gate = validate(GateConfig, params_section(params, "register"), prefix="register")
            r = register_run(run, tracking_uri, progress=_say)
            typer.echo(f"{r.name} v{r.version}  alias candidate  run {r.run_id}  ({r.seconds:.1f} s)")
            if not r.eligible:
                typer.echo(f"  not eligible for production: {r.reason}")
            decision = None
            if then_promote:
                decision = promote(r.name, r.version, gate=gate, tracking_uri=tracking_uri, progress=_say)
                typer.echo(decision.report())
        except (ConfigError, RegistryError, FileNotFoundError, ValueError) as err:
            fail(str(err))
        if json_out is not None:
            from aigc.workflows.pipeline import write_json

            record = {
                "model": r.name,
                "version": int(r.version),
                "run_id": r.run_id,
                "eligible": r.eligible,
                **r.figures,
            }
            if decision is not None:
                record.update(promoted=decision.promoted, gate=decision.reason)
            write_json(json_out, record)

    @app.command()
    def promote(
        model: str = typer.Argument(..., help="registered model, e.g. aigc-diffusion"),
        version: str | None = typer.Option(None, "--version", help="version to promote; default @candidate"),
        force: bool = typer.Option(False, "--force", help="move the alias even if the gate refuses"),
        fd_margin: float | None = typer.Option(
            None, "--fd-margin", help="eval/fd must drop by more than this"
        ),
        accuracy_tolerance: float | None = typer.Option(
            None, "--accuracy-tolerance", help="eval/cond_accuracy may drop at most this"
        ),
        num_samples: int | None = typer.Option(None, "--eval-samples", help="samples if re-evaluating"),
        tracking_uri: str | None = tracking,
    ) -> None:
        """Move `production` to the candidate if it beats production, measured the same way."""
        from aigc.config import ConfigError, validate
        from aigc.registry.gate import GateConfig, promote
        from aigc.registry.versions import RegistryError

        given = {"fd_margin": fd_margin, "accuracy_tolerance": accuracy_tolerance, "num_samples": num_samples}
        try:
            gate = validate(GateConfig, {k: v for k, v in given.items() if v is not None})
            decision = promote(
                model, version, force=force, gate=gate, tracking_uri=tracking_uri, progress=_say
            )
        except (ConfigError, RegistryError, FileNotFoundError, ValueError) as err:
            fail(str(err))
        typer.echo(decision.report())
        if not decision.promoted:
            raise typer.Exit(1)

    @app.command()
    def rollback(
        model: str = typer.Argument(..., help="registered model, e.g. aigc-diffusion"),
        tracking_uri: str | None = tracking,
    ) -> None:
        """Swap `production` and `previous`."""
        from aigc.registry.gate import rollback as do_rollback
        from aigc.registry.versions import RegistryError

        try:
            new, old = do_rollback(model, tracking_uri)
        except RegistryError as err:
            fail(str(err))
        typer.echo(f"{model}: production v{old} -> v{new}; previous is now v{old}")

    @app.command()
    def models(tracking_uri: str | None = tracking) -> None:
        """Registered aigc models with their aliases and the figures of each aliased version."""
        from aigc.registry.catalog import format_models, list_models

        typer.echo(format_models(list_models(tracking_uri)))

    @app.command()
    def lineage(
        ref: str = typer.Argument(..., help="e.g. aigc-diffusion@production or aigc-diffusion/3"),
        tracking_uri: str | None = tracking,
    ) -> None:
        """A version back to its run, data version (DVC md5), shard location and git sha."""
        from aigc.registry.catalog import format_lineage
        from aigc.registry.catalog import lineage as chain
        from aigc.registry.versions import RegistryError

        try:
            typer.echo(format_lineage(chain(ref, tracking_uri)))
        except RegistryError as err:
            fail(str(err))

    @app.command()
    def generate(
        model: str = typer.Option(..., "--model", help="e.g. aigc-diffusion@production"),
        prompt: list[str] = typer.Option(..., "--prompt", help="caption (repeatable: one grid row each)"),
        num_samples: int = typer.Option(8, "-n", "--num-samples", help="images per prompt"),
        seed: int | None = typer.Option(None, "--seed", help="sampling seed; default random"),
        set_: list[str] = typer.Option([], "--set", help="family option OPTION=VALUE (repeatable)"),
        out: Path = typer.Option(Path("grid.png"), "-o", "--out", help="grid PNG to write"),
        tracking_uri: str | None = tracking,
    ) -> None:
        """Generate a grid with a registered model, in this process."""
        from aigc.cli.evaluate import parse_options
        from aigc.registry.versions import RegistryError, client_for, load_version, resolve_version
        from aigc.training.grid import image_grid

        try:
            options = parse_options(set_)
            client = client_for(tracking_uri)
            version = resolve_version(client, model)
            module = load_version(client, version)
            images = module.generate(prompt, num_samples=num_samples, seed=seed, **options)
        except (RegistryError, ValueError) as err:
            fail(str(err))
        out.parent.mkdir(parents=True, exist_ok=True)
        image_grid(images, nrow=num_samples).save(out)
        typer.echo(
            f"wrote {out}: {len(prompt)} x {num_samples} images from {version.name} v{version.version}"
        )

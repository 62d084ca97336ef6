"""``aigc register | promote | rollback | models | lineage | generate``: the model registry."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
        model: str = typer.Option(
            ...,
            "--model",
            help="a registered version (aigc-diffusion@production, aigc-diffusion/3, models:/...), "
            "an export folder, a .ckpt, or an aigc train run's id or name",
        ),
        prompt: list[str] = typer.Option(
            ..., "--prompt", help="caption (repeatable: one grid row each; --interpolate: its 1 or 2 ends)"
        ),
        num_samples: int | None = typer.Option(
            None, "-n", "--num-samples", help="images per prompt (default 8); not with --interpolate"
        ),
        seed: int | None = typer.Option(
            None, "--seed", help="sampling seed; default random (--interpolate: the first end's, default 0)"
        ),
        set_: list[str] = typer.Option([], "--set", help="family option OPTION=VALUE (repeatable)"),
        init_image: Path | None = typer.Option(
            None,
            "--init-image",
            help="image-to-image: start from this PNG/JPEG, converted to the model's channels; it must "
            "be the model's size (it is not resized)",
        ),
        strength: float | None = typer.Option(
            None,
            "--strength",
            help="with --init-image: how much of the sampling is redone, 0 (the input) .. 1 (text-to-image) "
            "(default 0.6; 1 with --mask)",
        ),
        mask: Path | None = typer.Option(
            None,
            "--mask",
            help="inpainting, with --init-image: a grey PNG/JPEG of the model's size, white (>= 128) "
            "regenerated, black kept",
        ),
        interpolate: bool = typer.Option(
            False,
            "--interpolate",
            help="frames from the first --prompt and --seed to the second --prompt (default the same) "
            "and --seed-b, written as one strip",
        ),
        seed_b: int | None = typer.Option(
            None, "--seed-b", help="with --interpolate: the last frame's seed (default --seed)"
        ),
        frames: int | None = typer.Option(
            None, "--frames", help="with --interpolate: frames, the ends included (default 8)"
        ),
        out: Path = typer.Option(
            Path("grid.png"), "-o", "--out", help="grid PNG to write (--interpolate: a strip of the frames)"
        ),
        tracking_uri: str | None = tracking,
    ) -> None:
        """Generate a grid with a model, in this process; or edit an image (--init-image, --mask) or
        interpolate between two prompts and/or seeds (--interpolate). Edits need a family that
        supports them (the README's "Edit and explore" table)."""
        from aigc.cli.evaluate import parse_options
        from aigc.data.images import ImageInputError
        from aigc.registry.versions import RegistryError
        from aigc.training.grid import image_grid
        from aigc.workflows.model_ref import resolve_model

        try:
            g = _generation(
                prompt, num_samples, seed, init_image, strength, mask, interpolate, seed_b, frames
            )
            options = parse_options(set_)
            module, lineage = resolve_model(model, tracking_uri, option="--model")
            images = _generate_images(module, g, options)
        except (RegistryError, ImageInputError, ValueError) as err:
            fail(str(err))
        out.parent.mkdir(parents=True, exist_ok=True)
        image_grid(images, nrow=len(images) if g.interpolate else g.num_samples).save(out)
        if "version" in lineage:
            source = f"{lineage['model']} v{lineage['version']}"
        else:
            source = lineage.get("checkpoint") or lineage.get("path") or model
        if g.interpolate:
            what = f"{len(images)} frames in a row"
        else:
            what = f"{len(prompt)} x {g.num_samples} images"
            what += " (inpainted)" if mask else " (image-to-image)" if init_image else ""
        typer.echo(f"wrote {out}: {what} from {source}")


@dataclass(frozen=True)
class _Generation:
    """What one ``aigc generate`` asks for, its flags checked against each other."""

    prompts: list[str]
    num_samples: int
    seed: int | None
    init_image: Path | None = None
    strength: float | None = None
    mask: Path | None = None
    interpolate: bool = False
    seed_b: int | None = None
    frames: int = 8


def _generation(
    prompts: list[str],
    num_samples: int | None,
    seed: int | None,
    init_image: Path | None,
    strength: float | None,
    mask: Path | None,
    interpolate: bool,
    seed_b: int | None,
    frames: int | None,
) -> _Generation:
    """The flags as a :class:`_Generation`; a flag that does not go with the others is a ValueError
    naming both."""
    if interpolate:
        edits = (
            ("--init-image", init_image),
            ("--mask", mask),
            ("--strength", strength),
            ("-n", num_samples),
        )
        given = [flag for flag, value in edits if value is not None]
        if given:
            raise ValueError(f"--interpolate takes no {', '.join(given)}")
        if len(prompts) > 2:
            raise ValueError(f"--interpolate takes one or two --prompt (its ends), got {len(prompts)}")
        seed = 0 if seed is None else seed
        if prompts[0] == prompts[-1] and seed_b in (None, seed):
            raise ValueError("--interpolate needs two different ends: a second --prompt and/or --seed-b")
        return _Generation(
            prompts[:1] + prompts[-1:],
            1,
            seed,
            interpolate=True,
            seed_b=seed_b,
            frames=8 if frames is None else frames,
        )
    for flag, value in (("--seed-b", seed_b), ("--frames", frames)):
        if value is not None:
            raise ValueError(f"{flag} needs --interpolate")
    if init_image is None:
        for flag, value in (("--mask", mask), ("--strength", strength)):
            if value is not None:
                raise ValueError(f"{flag} needs --init-image: the image it edits")
    n = 8 if num_samples is None else num_samples
    return _Generation(prompts, n, seed, init_image, strength, mask)


def _generate_images(module: Any, g: _Generation, options: dict[str, Any]) -> Any:
    """The images of one ``aigc generate``: uint8 ``(N, C, H, W)`` (interpolation: the frames).
    The init image and mask files are read at the model's size (:mod:`aigc.data.images`)."""
    import torch

    from aigc.data.images import read_image_file, read_mask_file

    if g.interpolate:
        return module.interpolate(g.prompts[0], g.prompts[-1], g.frames, g.seed, g.seed_b, **options)
    size, channels = module.image_size, module.channels
    init = mask = None
    if g.init_image is not None:
        init = torch.from_numpy(
            read_image_file(g.init_image, what="--init-image", size=size, channels=channels)
        )
    if g.mask is not None:
        mask = torch.from_numpy(read_mask_file(g.mask, what="--mask", size=size))
    return module.generate(
        g.prompts,
        num_samples=g.num_samples,
        seed=g.seed,
        init_images=init,
        strength=g.strength,
        masks=mask,
        **options,
    )

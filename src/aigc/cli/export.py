"""``aigc export``: a trained model as a folder to take away (aigc export, or diffusers' layout)."""

from __future__ import annotations

from pathlib import Path

import typer

from aigc.cli.common import fail


def register(app: typer.Typer) -> None:
    @app.command("export")
    def export_cmd(
        ref: str = typer.Argument(
            ...,
            help="registered version (aigc-sd@production, aigc-sd/3), run id or name, the --metrics-out "
            ".json of an aigc train run, export folder or .ckpt",
        ),
        out: Path = typer.Argument(..., help="folder to write"),
        diffusers: bool = typer.Option(
            False,
            "--diffusers",
            help="write diffusers' layout (sd family): the pipeline folder, or a LoRA model's adapter",
        ),
        merge: bool = typer.Option(
            False, "--merge", help="merge a LoRA model's adapters into the base weights"
        ),
        overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing OUT"),
        tracking_uri: str | None = typer.Option(
            None, "--tracking-uri", help="store of a registered REF or run; default MLFLOW_TRACKING_URI"
        ),
    ) -> None:
        """Write a model as an aigc export folder, or with --diffusers in the diffusers layout.

        Without --merge a LoRA model is written as its adapter and a reference to its base
        (with --diffusers: pytorch_lora_weights.safetensors for pipe.load_lora_weights).
        """
        from aigc.data.manifest import DatasetError
        from aigc.registry.versions import RegistryError
        from aigc.workflows.export import export_ref

        try:
            r = export_ref(
                ref,
                out,
                diffusers=diffusers,
                merge=merge,
                overwrite=overwrite,
                tracking_uri=tracking_uri,
                progress=lambda m: typer.echo(m, err=True),
            )
        except (DatasetError, RegistryError, OSError, ValueError) as err:
            fail(str(err))
        what = {
            "aigc": "aigc export folder" + (" (LoRA merged)" if r.merged else ""),
            "diffusers": "diffusers pipeline folder" + (" (LoRA merged)" if r.merged else ""),
            "diffusers-lora": "diffusers LoRA adapter (load the base, then pipe.load_lora_weights)",
        }[r.layout]
        typer.echo(
            f"wrote {r.path}: {what} of a {r.family} model, {len(r.files)} files, "
            f"{r.bytes / 2**20:.1f} MiB ({r.seconds:.1f} s)"
        )

"""``aigc quickstart``: run every step that exists on the embedded defaults."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import typer

from aigc import project_root
from aigc.cli.data import data_config
from aigc.config import ConfigError
from aigc.data.build import build_dataset
from aigc.data.manifest import DatasetError, VerifyReport, read_manifest, verify_dataset
from aigc.data.preview import iter_samples, write_preview
from aigc.data.version import version


@dataclass
class QuickstartResult:
    dataset: Path
    built: bool  # False when an existing dataset was verified instead
    report: VerifyReport
    preview: Path
    data_version: str


def run_quickstart(root: str | Path, echo: Callable[[str], None] = print) -> QuickstartResult:
    """Build ``<root>/datasets/digits`` if missing, verify it, print a summary, write a preview.

    The build settings are the ``data`` section of ``<root>/params.yaml`` when it exists (as for
    ``dvc repro``), else the defaults. Raises :class:`DatasetError` when an existing dataset fails
    verification (it is not rebuilt silently: rebuild with ``aigc data build digits --overwrite``).
    """
    root = Path(root)
    # The same settings as `dvc repro` (params.yaml's data section) when the project has them.
    params = root / "params.yaml"
    cfg = data_config(params if params.is_file() else None, [])
    dataset = root / cfg.root / cfg.name
    built = not dataset.exists()
    if built:
        echo(f"building {cfg.name} into {dataset}")
        build_dataset(cfg, dataset, progress=echo)
    else:
        echo(f"{dataset} exists; verifying it")
    report = verify_dataset(dataset)
    if not report.ok:
        raise DatasetError(
            f"{dataset} fails verification: {'; '.join(report.problems())}; "
            f"rebuild with `aigc data build {cfg.name} --overwrite`"
        )
    manifest = read_manifest(dataset)
    counts = ", ".join(f"{s} {e['num_samples']}" for s, e in manifest["splits"].items())
    data_version = version(dataset)
    echo(
        f"{cfg.name}: {counts} samples, {manifest['image_size']}x{manifest['image_size']}, "
        f"{report.checked} shards verified, data version {data_version}"
    )
    for s in iter_samples(dataset, limit=4):
        echo(f"  {s.key}: {s.caption}")
    preview = write_preview(dataset, root / "outputs" / "quickstart" / f"{cfg.name}-preview.png")
    echo(f"preview: {preview}")
    return QuickstartResult(dataset, built, report, preview, data_version)


def register(app: typer.Typer) -> None:
    @app.command()
    def quickstart(
        train: bool = typer.Option(
            True, "--train/--no-train", help="train the diffusion model after the data"
        ),
        steps: int | None = typer.Option(None, "--steps", help="override trainer.max_steps"),
        workers: int = typer.Option(2, "--workers", help="Ray Train workers"),
    ) -> None:
        """Build and verify the digits dataset, then train the diffusion model with 2 workers on the
        embedded Ray and print the run summary."""
        root = project_root()
        try:
            result = run_quickstart(root, echo=typer.echo)
        except (DatasetError, ConfigError) as err:
            typer.echo("error: " + " ".join(str(err).split()), err=True)
            raise typer.Exit(1) from None
        if not train:
            return
        from aigc.cli.train import print_summary
        from aigc.tracking import TrackingUnavailable
        from aigc.training import TrainError
        from aigc.training import train as run_train

        overrides = [f"data.location={result.dataset}"]
        if steps is not None:
            overrides.append(f"trainer.max_steps={steps}")
        typer.echo(f"training models/diffusion.yaml with {workers} workers on the embedded Ray")
        try:
            summary = run_train(root / "models" / "diffusion.yaml", overrides, workers=workers)
        except (ConfigError, TrainError, TrackingUnavailable) as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(1) from None
        print_summary(summary)

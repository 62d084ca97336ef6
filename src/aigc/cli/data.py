"""``aigc data``: build, verify and show WebDataset shard folders.

The commands parse arguments and print; the work is done by :mod:`aigc.data`.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import typer

from aigc import project_root
from aigc.config import ConfigError, DataConfig, load_data_config, validate
from aigc.data.build import build_dataset
from aigc.data.location import dataset_path
from aigc.data.manifest import DatasetError, read_manifest, verify_dataset
from aigc.data.preview import iter_samples, write_preview
from aigc.data.version import version

app = typer.Typer(help="Build, verify and inspect image-text shard datasets.", no_args_is_help=True)


def fail(message: str, code: int) -> typer.Exit:
    """Print a one-line error to stderr and return the Exit to raise (no traceback)."""
    typer.echo("error: " + " ".join(line.strip() for line in message.splitlines() if line.strip()), err=True)
    return typer.Exit(code)


class _EchoHandler(logging.Handler):
    """Writes to whatever stderr is current at each record (not the one at creation)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            typer.echo(self.format(record), err=True)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def show_warnings() -> None:
    """Send aigc's warnings (skipped inputs, by path) to stderr, once per process."""
    logger = logging.getLogger("aigc")
    if not any(isinstance(h, _EchoHandler) for h in logger.handlers):
        handler = _EchoHandler(logging.WARNING)
        handler.setFormatter(logging.Formatter("warning: %(message)s"))
        logger.addHandler(handler)


@app.command()
def build(
    name: str | None = typer.Argument(None, help="dataset name (default: the config's, 'digits')"),
    source: str | None = typer.Option(None, help="digits | openmoji | folder | img2dataset"),
    source_path: Path | None = typer.Option(None, help="input folder for folder/img2dataset"),
    out: Path | None = typer.Option(None, help="output folder (default <project>/datasets/NAME)"),
    params: Path | None = typer.Option(
        None, help="YAML file whose data: section configures the build [default: <project>/params.yaml]"
    ),
    set_: list[str] = typer.Option([], "--set", help="override, e.g. --set data.image_size=16"),
    overwrite: bool = typer.Option(False, help="replace an existing dataset folder"),
) -> None:
    """Build train/val WebDataset shards and manifest.json from a source."""
    show_warnings()
    if params is None and (project_root() / "params.yaml").is_file():
        params = project_root() / "params.yaml"
    try:
        cfg = load_data_config(
            params, set_, name=name, source=source, source_path=str(source_path) if source_path else None
        )
    except ConfigError as err:
        raise fail(str(err), 2) from None
    if params is not None:
        typer.echo(f"config: data section of {params}, overrides {set_ or 'none'}")
    try:
        summary = build_dataset(cfg, out, progress=typer.echo, overwrite=overwrite)
    except DatasetError as err:
        raise fail(str(err), 1) from None
    counts = ", ".join(f"{s} {n} samples in {summary.shards[s]} shards" for s, n in summary.counts.items())
    skipped = ", ".join(f"{k} {v}" for k, v in summary.skipped.items())
    typer.echo(f"built {summary.name} at {summary.path} in {summary.seconds:.1f}s: {counts}")
    typer.echo(f"skipped: {skipped}")
    typer.echo(f"digest: {summary.digest}")


@app.command()
def encode(
    dataset: str = typer.Argument(..., help="image dataset: a folder, a URL, or a name under datasets/"),
    autoencoder: str = typer.Option(
        ...,
        "--autoencoder",
        help="registered version (aigc-autoencoder@candidate, aigc-autoencoder/3), the --metrics-out "
        ".json of an aigc train run (as the DVC encode stage gives it), export folder or .ckpt, or "
        "the name or id of an aigc train run",
    ),
    out: Path = typer.Option(
        ..., "--out", help="latent dataset folder to write, e.g. datasets/emoji32-latents"
    ),
    name: str | None = typer.Option(None, help="dataset name in the manifest (default: the folder's name)"),
    batch_size: int = typer.Option(256, "--batch-size", min=1, help="images per encoder call"),
    threads: int | None = typer.Option(None, "--threads", min=1, help="torch threads (default torch's)"),
    tracking_uri: str | None = typer.Option(
        None, "--tracking-uri", help="store of a registered --autoencoder; default MLFLOW_TRACKING_URI"
    ),
    overwrite: bool = typer.Option(False, help="replace an existing latent dataset folder"),
) -> None:
    """Encode an image dataset with an autoencoder into latent shards (for latent diffusion / AR).

    Keeps the split, keys and captions; stores the autoencoder's export in OUT/autoencoder and its
    lineage (registered version, run, or path) in the manifest. Train on OUT like on any dataset.
    """
    from aigc.registry.versions import RegistryError
    from aigc.workflows.encode import encode_dataset

    show_warnings()
    location = dataset
    if "://" not in dataset and "/" not in dataset and not Path(dataset).exists():
        # A bare name: the project's dataset of that name (under the default data.root). Not a
        # valid name: left as the path it is, which the encoder then reports missing.
        with contextlib.suppress(ConfigError):
            location = str(dataset_path(validate(DataConfig, {"name": dataset}, prefix="data")))
    try:
        summary = encode_dataset(
            location,
            autoencoder,
            out,
            name=name,
            batch_size=batch_size,
            threads=threads,
            overwrite=overwrite,
            tracking_uri=tracking_uri,
            progress=typer.echo,
        )
    except (DatasetError, RegistryError, OSError, ValueError) as err:
        raise fail(str(err), 1) from None
    m = read_manifest(summary.path)
    spec = m["latent"]
    counts = ", ".join(f"{s} {n} samples in {summary.shards[s]} shards" for s, n in summary.counts.items())
    typer.echo(f"encoded {summary.name} at {summary.path} in {summary.seconds:.1f}s: {counts}")
    scale = f", scale {spec['scale']:.4g}" if spec.get("scale") else ""
    typer.echo(f"latents: {spec['kind']} {spec['dtype']} {tuple(spec['shape'])}{scale}")
    typer.echo(f"autoencoder: {spec['autoencoder']}")
    typer.echo(f"digest: {summary.digest}")


@app.command()
def verify(path: Path = typer.Argument(..., help="dataset folder")) -> None:
    """Re-hash every shard against manifest.json; exit 1 naming each bad shard."""
    try:
        report = verify_dataset(path)
    except DatasetError as err:
        raise fail(str(err), 1) from None
    if not report.ok:
        for line in report.problems():
            typer.echo(f"bad: {path / line}", err=True)
        raise typer.Exit(1)
    typer.echo(f"ok: {report.checked} shards match the manifest of {path}")


@app.command()
def show(
    path: Path = typer.Argument(..., help="dataset folder"),
    preview: Path | None = typer.Option(None, help="write a PNG grid of the first samples here"),
    n: int = typer.Option(16, "-n", "--num", min=1, help="samples in the preview"),
) -> None:
    """Print the manifest summary and a few captions; optionally write a preview grid."""
    try:
        m = read_manifest(path)
    except DatasetError as err:
        raise fail(str(err), 1) from None
    typer.echo(f"{m['name']}  ({path})")
    typer.echo(f"  source: {m['source'].get('type')}  path: {m['source'].get('path')}")
    typer.echo(f"  image: {m['image_size']}x{m['image_size']}, {m['channels']} channel(s)")
    for split, entry in m["splits"].items():
        typer.echo(f"  {split}: {entry['num_samples']} samples in {len(entry['shards'])} shards")
    typer.echo("  skipped: " + ", ".join(f"{k} {v}" for k, v in m["skipped"].items()))
    typer.echo(f"  digest: {m['digest']}")
    typer.echo(f"  data version: {version(path)}")
    typer.echo("  captions:")
    for s in iter_samples(path, limit=5):
        label = s.meta.get("label")
        typer.echo(f"    {s.key}: {s.caption}" + (f"  (label {label})" if label is not None else ""))
    if preview is not None:
        typer.echo(f"preview: {write_preview(path, preview, n)}")

"""``aigc evaluate``: the ``eval/*`` figures of a checkpoint or export, with the reference evaluator."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import typer

from aigc.cli.common import fail
from aigc.contract import DEFAULT_EVAL_SAMPLES


def parse_options(items: list[str]) -> dict[str, Any]:
    """``["steps=20", "sampler=ddpm"]`` -> ``{"steps": 20, "sampler": "ddpm"}`` (values parsed as YAML)."""
    import yaml

    options: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {item!r}: expected OPTION=VALUE, e.g. steps=20")
        try:
            options[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            options[key.strip()] = raw
    return options


def format_report(result: dict[str, Any]) -> str:
    """A readable table of an evaluation result."""

    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "YES" if v else "no"
        if isinstance(v, float):
            return f"{v:.4f}" if math.isfinite(v) and abs(v) < 1e4 else f"{v:.4g}"
        return str(v)

    lines = []
    for key, value in result.items():
        if key == "criteria":
            value = ", ".join(f"{k}={fmt(v)}" for k, v in value.items())
        elif key == "generate_options":
            value = ", ".join(f"{k}={v}" for k, v in value.items()) or "(model defaults)"
        lines.append(f"{key:<28} {fmt(value)}")
    return "\n".join(lines)


def register(app: typer.Typer) -> None:
    @app.command()
    def evaluate(
        # Strings, not Paths: Path("s3://bucket/x") would collapse the URL's "//".
        model: str = typer.Argument(
            ..., help="export folder or Lightning .ckpt file (path or URL, s3://...)"
        ),
        data: str | None = typer.Option(
            None, "--data", help="shard folder or URL (s3://...); default <project>/datasets/digits"
        ),
        num_samples: int = typer.Option(
            DEFAULT_EVAL_SAMPLES, "-n", "--num-samples", help="images to generate"
        ),
        seed: int = typer.Option(0, "--seed", help="sampling seed (recorded with the figures)"),
        batch_size: int = typer.Option(100, "--batch-size", help="images per generate() call"),
        set_: list[str] = typer.Option([], "--set", help="generate option OPTION=VALUE (repeatable)"),
        json_out: Path | None = typer.Option(None, "--json", help="also write the result as JSON here"),
        cache_dir: Path | None = typer.Option(
            None, "--cache-dir", help="evaluator cache; default .cache/evaluators"
        ),
        threads: int | None = typer.Option(None, "--threads", min=1, help="torch threads; default torch's"),
        run_id: str | None = typer.Option(
            None,
            "--run",
            help="also record the figures (eval/* metrics, aigc.eval.* tags) in this run",
        ),
        tracking_uri: str | None = typer.Option(
            None,
            "--tracking-uri",
            help="store of --run; default MLFLOW_TRACKING_URI or mlflow/mlflow.db",
        ),
    ) -> None:
        """Generate images from the evaluation prompts and measure FD, CLIP score, accuracy and guards."""
        from aigc.config import DataConfig
        from aigc.data.location import dataset_path
        from aigc.evaluation.final import final_evaluation, load_model_from, log_evaluation

        dataset = data if data is not None else str(dataset_path(DataConfig()))
        try:
            options = parse_options(set_)
            module = load_model_from(model)
            result = final_evaluation(
                module,
                dataset,
                num_samples=num_samples,
                seed=seed,
                batch_size=batch_size,
                threads=threads,
                cache_dir=cache_dir,
                progress=lambda m: typer.echo(m, err=True),
                **options,
            )
        except (OSError, KeyError, ValueError) as err:  # DatasetError is a ValueError
            fail(str(err).strip("'\""))
        if run_id is not None:
            from mlflow.exceptions import MlflowException

            from aigc.tracking import TrackingUnavailable, ensure_tracking_store, resolve_tracking_uri

            uri = resolve_tracking_uri(tracking_uri)
            try:
                ensure_tracking_store(uri)
                log_evaluation(uri, run_id, result)
            except (TrackingUnavailable, MlflowException) as err:
                fail(f"could not record the figures in run {run_id} of {uri}: {err}")
            typer.echo(f"recorded in MLflow run {run_id} ({uri})", err=True)
        result = {"model": model, "data": dataset, **result}
        typer.echo(format_report(result))
        if json_out is not None:
            json_out.parent.mkdir(parents=True, exist_ok=True)
            json_out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
            typer.echo(f"wrote {json_out}", err=True)

    @app.command()
    def reference(
        data: str | None = typer.Argument(
            None, help="shard folder or URL (s3://...); default <project>/datasets/digits"
        ),
        json_out: Path | None = typer.Option(None, "--json", help="also write the evaluator's record here"),
        cache_dir: Path | None = typer.Option(
            None, "--cache-dir", help="evaluator cache; default AIGC_EVALUATOR_CACHE or .cache/evaluators"
        ),
        threads: int | None = typer.Option(None, "--threads", min=1, help="torch threads; default torch's"),
    ) -> None:
        """Train the dataset's reference evaluator once (cached by data version) and print its record.

        Every later evaluation of this data version (aigc train, aigc evaluate, the gate) loads it."""
        import time

        import torch

        from aigc.config import DataConfig
        from aigc.data.location import dataset_path
        from aigc.evaluation.reference import reference_evaluator

        dataset = data if data is not None else str(dataset_path(DataConfig()))
        start = time.perf_counter()
        try:
            evaluator = reference_evaluator(
                dataset,
                cache_dir=cache_dir,
                progress=lambda m: typer.echo(m, err=True),
                threads=threads or torch.get_num_threads(),
            )
        except (FileNotFoundError, ValueError) as err:  # DatasetError is a ValueError
            fail(str(err).strip("'\""))
        # What DVC tracks (pipeline/reference.json): which evaluator every eval/* figure of this data
        # version is measured with, and how well its classifier reads held-out digits.
        record = {
            "data_version": evaluator.data_version,
            "evaluator_hash": evaluator.hash,
            **{k: evaluator.info[k] for k in ("val_accuracy", "train_seconds") if k in evaluator.info},
        }
        typer.echo(format_report({"data": dataset, "evaluator": str(evaluator.path), **record}))
        typer.echo(f"ready in {time.perf_counter() - start:.1f} s", err=True)
        if json_out is not None:
            from aigc.workflows.pipeline import write_json

            write_json(json_out, record)
            typer.echo(f"wrote {json_out}", err=True)

"""The final evaluation of a model, and recording it in the model's MLflow run.

One function for every caller: ``aigc train`` on its last checkpoint, ``aigc evaluate`` on any
checkpoint or export (``--run`` records the figures in a run), and the registry's gate when it must
re-measure two versions the same way::

    report = final_evaluation(module, "datasets/digits", num_samples=500, seed=0, threads=2,
                              progress=print)
    log_evaluation(tracking_uri, run_id, report, step=global_step)

It reports what it is doing through ``progress`` (training the dataset's reference evaluator when
it is not cached yet can take minutes on a new dataset) and runs on ``threads`` torch threads. The
dataset, and the model given to :func:`load_model_from`, may be local paths or fsspec URLs
(``s3://bucket/datasets/digits``): every file is opened through fsspec, credentials come from the
environment (``docs/storage.md``).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from aigc.contract import (
    DEFAULT_EVAL_SAMPLES,
    EVAL_TAG_PREFIX,
    GUARDS,
    INIT_DIR,
    PROVENANCE,
    eval_figures,
)
from aigc.evaluation.evaluate import evaluate_model
from aigc.evaluation.reference import reference_evaluator


def final_evaluation(
    module: Any,
    dataset: str | Path,
    *,
    num_samples: int = DEFAULT_EVAL_SAMPLES,
    seed: int = 0,
    batch_size: int = 100,
    threads: int | None = None,
    cache_dir: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
    **generate_options: Any,
) -> dict[str, Any]:
    """The dataset's reference evaluator (trained and cached on first use), then
    :func:`~aigc.evaluation.evaluate.evaluate_model` of ``module``: every ``eval/*`` figure with its
    provenance (an autoencoder's are reconstruction figures, ``eval/psnr`` among them). ``threads``
    torch threads for both (default: as many as torch uses now; the ``AIGC_EVALUATOR_THREADS``
    variable still overrides the evaluator's training threads).

    A latent dataset (``aigc data encode``) is measured on the image dataset its latents came from:
    the evaluator measures pixels, and a latent model generates pixels."""
    from aigc.data.latents import evaluation_dataset

    say = progress or (lambda _msg: None)
    dataset = evaluation_dataset(dataset)
    previous = torch.get_num_threads()
    threads = max(1, int(threads or previous))
    torch.set_num_threads(threads)
    try:
        evaluator = reference_evaluator(dataset, cache_dir=cache_dir, progress=progress, threads=threads)
        what = "reconstructions" if getattr(module, "family", None) == "autoencoder" else "samples"
        say(f"evaluating: {num_samples} {what} (seed {seed}) against evaluator {evaluator.hash[:12]}")
        start = time.perf_counter()
        report = evaluate_model(
            module,
            evaluator,
            dataset,
            num_samples=num_samples,
            seed=seed,
            batch_size=batch_size,
            **generate_options,
        )
    finally:
        torch.set_num_threads(previous)
    figures = ", ".join(
        f"{k.removeprefix('eval/')} {report[k]:.4g}"
        for k in ("eval/fd", "eval/clip_score", "eval/cond_accuracy", "eval/psnr")
        if k in report
    )
    say(f"evaluated in {time.perf_counter() - start:.0f} s: {figures}")
    return report


def load_model_from(location: str | Path) -> Any:
    """The family module of an export folder or a Lightning ``.ckpt`` at a local path or fsspec URL.

    The files are copied into a temporary folder first (``torch.load`` and safetensors read local
    files); nothing is unpickled (see :func:`aigc.models.export.load_model`). A missing location is a
    ``FileNotFoundError`` naming it, any other failure to read it (credentials, endpoint) an
    ``OSError`` naming it.
    """
    import fsspec

    from aigc.data.manifest import unreachable
    from aigc.models.export import load_model

    url = str(location)
    with tempfile.TemporaryDirectory(prefix="aigc-model-") as tmp:
        try:
            fs, path = fsspec.core.url_to_fs(url)
            path = path.rstrip("/")
            if not fs.exists(path):
                raise FileNotFoundError(f"{url}: no such export folder or checkpoint")
            local = Path(tmp) / (PurePosixPath(path).name or "model")
            if fs.isdir(path):
                for file in fs.find(path):
                    target = local / file[len(path) :].lstrip("/")
                    target.parent.mkdir(parents=True, exist_ok=True)
                    fs.get_file(file, str(target))
            else:
                fs.get_file(path, str(local))
        except FileNotFoundError:
            raise
        except Exception as err:  # noqa: BLE001 - botocore & co. raise their own types: name the URL
            raise OSError(f"{url}: cannot read the model: {unreachable(url, err)}") from err
        # A LoRA checkpoint loads onto its run folder's init-from/ (read where it is, local or URL).
        base = None if local.is_dir() else url.rstrip("/").rsplit("/", 2)[0] + f"/{INIT_DIR}"
        return load_model(local, base=base)


def log_evaluation(
    tracking_uri: str, run_id: str, report: dict[str, Any], step: int = 0, metrics: bool = True
) -> None:
    """Record a report in run ``run_id``: ``eval/*`` metrics at ``step`` (unless ``metrics`` is
    False: the figures are in the run already), the provenance tags (``aigc.eval.evaluator_hash``,
    ``data_version``, ``num_samples``, ``seed``) and the guards."""
    from mlflow.entities import Metric, RunTag

    from aigc.tracking.backend import client_for

    now = int(time.time() * 1000)
    figures = eval_figures(report) if metrics else {}
    entries = [Metric(k, v, now, int(step)) for k, v in figures.items()]
    tags = [RunTag(f"{EVAL_TAG_PREFIX}{k}", str(report[k])) for k in (*PROVENANCE, *GUARDS) if k in report]
    client_for(tracking_uri).log_batch(run_id, metrics=entries, tags=tags)

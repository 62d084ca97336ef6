"""Pixel-space vs latent diffusion on the emoji, trained for the same wall-clock budget.

For each size (32 and 64 px), on this machine:

1. the emoji dataset (``openmoji`` source, RGB) and its reference evaluator;
2. the KL autoencoder (``models/autoencoder-kl<size>.yaml``) trained for ``--ae-seconds``, then the
   dataset encoded once (``aigc.workflows.encode.encode_dataset``, what ``aigc data encode`` runs);
3. pixel-space diffusion (``models/diffusion-rgb<size>.yaml``) and latent diffusion
   (``models/latent-diffusion-rgb<size>.yaml``) each trained for ``--seconds`` with aigc's Trainer
   (one process, no Ray, no MLflow; the LR schedule fitted to the clock as in ``quality.py``);
4. both evaluated by the image dataset's reference evaluator on ``--samples`` images from val
   captions: FD (with the train-vs-val floor) and CLIP score (with real val images' score), training
   samples/s, sampling images/s.

The autoencoder's own training time is reported separately (it is paid once per dataset, then every
latent model reuses the encoding). Prints one JSON object per size with the two records and the
latent/pixel ratios.

    .venv/bin/python benchmarks/latent.py --sizes 32 --seconds 300 --ae-seconds 180
    python benchmarks/latent.py --seconds 600 --precision bf16-mixed        # on a CUDA machine
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

from quality import _clock_schedule, _step_timer


def emoji_dataset(size: int, root: Path | None) -> Path:
    """The emoji shards at ``size`` px RGB, built into ``root`` (default: the project's datasets
    folder) unless they exist (seconds)."""
    from aigc.config import DataConfig
    from aigc.data import build_dataset, dataset_path

    cfg = DataConfig(name=f"emoji{size}", source="openmoji", image_size=size, channels=3)
    out = root / cfg.name if root is not None else dataset_path(cfg)
    if not (out / "manifest.json").is_file():
        build_dataset(cfg, out)
    return out


def fit_for(config: Path, location: Path, seconds: float, args: argparse.Namespace) -> tuple[Any, dict]:
    """Train ``config`` on ``location`` for ``seconds``; returns the module and its speed record."""
    import pytorch_lightning as pl
    import torch

    from aigc.config import lightning_precision, load_config
    from aigc.data.loader import ShardDataModule
    from aigc.models import build_module_for_dataset
    from aigc.training.trainer import build_trainer

    overrides = [f"data.location={location}", "trainer.max_steps=10000000", *args.set]
    if args.batch_size:
        overrides.append(f"data.batch_size={args.batch_size}")
    if args.precision:
        overrides.append(f"trainer.precision={args.precision}")
    cfg = load_config(config, overrides)
    pl.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    module = build_module_for_dataset(cfg, str(location))
    use_gpu = torch.cuda.is_available() and not args.cpu
    timer = _step_timer()
    trainer = build_trainer(
        module,
        cfg.trainer,
        use_gpu=use_gpu,
        callbacks=[timer, _clock_schedule(module, seconds)],
        max_time=timedelta(seconds=seconds),
        limit_val_batches=0,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=ShardDataModule(cfg.data, location=location, seed=cfg.trainer.seed))
    steps = int(trainer.global_step)
    rate = timer.steps_per_s(steps)
    return module.eval(), {
        "config": str(config.relative_to(config.parents[1])),
        "steps": steps,
        "seconds": round(time.perf_counter() - start, 1),
        "batch_size": cfg.data.batch_size,
        "train_samples_per_s": None if rate is None else rate * cfg.data.batch_size,
        "precision": lightning_precision(cfg.trainer.precision, use_gpu),
        "params": sum(p.numel() for p in module.parameters() if p.requires_grad),
    }


def evaluate(module: Any, evaluator: Any, data: Path, args: argparse.Namespace) -> dict[str, Any]:
    from aigc.evaluation import evaluate_model

    options = {"steps": args.sample_steps} if args.sample_steps else {}
    r = evaluate_model(module, evaluator, data, num_samples=args.samples, seed=0, **options)
    keys = ("eval/fd", "eval/fd_train_val", "eval/clip_score", "eval/clip_score_val", "eval/diversity")
    return {k: r[k] for k in keys} | {
        "sampling_images_per_s": r["perf/sampling_images_per_s"],
        "collapse": r["collapse"],
        "copying": r["copying"],
    }


def run_size(size: int, root: Path | None, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    from aigc.data.manifest import read_manifest
    from aigc.evaluation import evaluate_model, reference_evaluator
    from aigc.models.export import export_model
    from aigc.workflows.encode import encode_dataset

    models = Path(__file__).resolve().parents[1] / "models"
    data = emoji_dataset(size, root)
    say = (lambda m: print(m, file=sys.stderr)) if args.verbose else None
    evaluator = reference_evaluator(data, cache_dir=args.cache_dir, progress=say)
    ae, ae_record = fit_for(models / f"autoencoder-kl{size}.yaml", data, args.ae_seconds, args)
    recon = evaluate_model(ae, evaluator, data, num_samples=args.samples, seed=0)
    ae_record |= {k: recon[k] for k in ("eval/psnr", "eval/fd")}
    t0 = time.perf_counter()
    latents = work / f"emoji{size}-kl"
    encode_dataset(data, str(export_model(ae, work / f"ae{size}")), latents, overwrite=True)
    ae_record["encode_seconds"] = round(time.perf_counter() - t0, 1)
    ae_record["latent_shape"] = read_manifest(latents)["latent"]["shape"]

    records = {}
    for kind, config, location in (
        ("pixel", models / f"diffusion-rgb{size}.yaml", data),
        ("latent", models / f"latent-diffusion-rgb{size}.yaml", latents),
    ):
        module, record = fit_for(config, location, args.seconds, args)
        records[kind] = record | evaluate(module, evaluator, data, args)
    pixel, latent = records["pixel"], records["latent"]

    def ratio(key: str) -> float | None:
        a, b = latent.get(key), pixel.get(key)
        return None if not a or not b else a / b

    return {
        "benchmark": "latent",
        "image_size": size,
        "budget_seconds": args.seconds,
        "samples": args.samples,
        "evaluator_hash": evaluator.hash,
        "data_version": evaluator.data_version,
        "autoencoder": ae_record,
        "pixel": pixel,
        "latent": latent,
        "latent_over_pixel": {
            "train_samples_per_s": ratio("train_samples_per_s"),
            "sampling_images_per_s": ratio("sampling_images_per_s"),
            "eval/fd": ratio("eval/fd"),
            "eval/clip_score": ratio("eval/clip_score"),
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64], choices=[32, 64])
    parser.add_argument("--seconds", type=float, default=300.0, help="budget of each diffusion model")
    parser.add_argument("--ae-seconds", type=float, default=180.0, help="training budget of the autoencoder")
    parser.add_argument("--samples", type=int, default=200, help="images generated for each evaluation")
    parser.add_argument("--sample-steps", type=int, default=None, help="DDIM steps (default: the configs')")
    parser.add_argument("--batch-size", type=int, default=None, help="data.batch_size of every model")
    parser.add_argument("--data-root", type=Path, default=None, help="where emoji<size> are (or are built)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="evaluator cache")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default torch's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--precision", choices=("32", "bf16-mixed", "16-mixed"), default=None)
    parser.add_argument("--cpu", action="store_true", help="train on CPU even when CUDA is available")
    parser.add_argument("--verbose", action="store_true", help="progress on stderr")
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*ignored on CPU.*")
    with tempfile.TemporaryDirectory(prefix="aigc-latent-bench-") as tmp:
        for size in args.sizes:
            print(json.dumps(run_size(size, args.data_root, Path(tmp), args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Quality per family for a fixed wall-clock budget: conditional accuracy, FD, CLIP score, speed.

Each family trains from its shipped ``models/<family>.yaml`` with a plain Lightning Trainer (one
process, no Ray, no MLflow) on the digits shards, stopped by ``max_time``. The clock, not the
step count, ends training, so the YAML's LR schedule is fitted to the clock: after 10, 30, 50 and
70 % of the budget the measured step rate re-sets the schedule's length (``trainer.max_steps`` as
the LR lambda reads it) so the cosine decay ends as the budget does; the final length is recorded
as ``schedule_steps``. ``--max-steps N`` fixes it instead. The model is then evaluated with the
reference evaluator on ``--samples`` images generated from the held-out caption template. Prints
one JSON object per family, one per line.

    .venv/bin/python benchmarks/quality.py                       # every family, 300 s each
    .venv/bin/python benchmarks/quality.py --family diffusion --seconds 60 --threads 2
    .venv/bin/python benchmarks/quality.py --family diffusion --set model.text.encoder=minilm
    python benchmarks/quality.py --seconds 60 --precision bf16-mixed   # on a CUDA machine
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

from aigc.config import FAMILIES


def _step_timer():
    """A callback recording when the first and the last training batch ended (startup excluded)."""
    import pytorch_lightning as pl

    class StepTimer(pl.Callback):
        def __init__(self) -> None:
            self.first: float | None = None
            self.last: float | None = None
            self.first_step = 0

        def on_train_batch_end(self, trainer, *args: Any) -> None:
            now = time.perf_counter()
            if self.first is None:
                self.first, self.first_step = now, trainer.global_step
            self.last = now

        def steps_per_s(self, steps: int) -> float | None:
            if self.first is None or self.last is None or self.last <= self.first:
                return None
            return (steps - self.first_step) / (self.last - self.first)

    return StepTimer()


def _clock_schedule(module: Any, budget_s: float):
    """A callback fitting the LR schedule's length to a wall-clock budget.

    The families' LR lambdas read ``module.trainer_cfg.max_steps`` at every step, so re-setting it
    re-times the cosine decay. At each checkpoint (a share of the budget) the schedule is set to
    end at ``end_share`` of the budget at the rate measured since the first step; it never ends
    before the current step, and the last checkpoint is early enough that the decay stays smooth.
    """
    import pytorch_lightning as pl

    class ClockSchedule(pl.Callback):
        checkpoints = (0.1, 0.3, 0.5, 0.7)
        end_share = 0.98  # leave the last ~2 % of the budget at the end of the decay

        def __init__(self) -> None:
            self.start: float | None = None
            self.start_step = 0
            self.next = 0

        def on_train_batch_end(self, trainer, *args: Any) -> None:
            now, step = time.perf_counter(), trainer.global_step
            if self.start is None:  # the first step carries start-up costs: time from its end
                self.start, self.start_step = now, step
                return
            elapsed = now - self.start
            if self.next >= len(self.checkpoints) or elapsed < self.checkpoints[self.next] * budget_s:
                return
            self.next += 1
            rate = (step - self.start_step) / elapsed
            remaining = max(0.0, self.end_share * budget_s - elapsed)
            module.trainer_cfg.max_steps = max(step + 1, int(step + rate * remaining))

    return ClockSchedule()


def run_family(family: str, data: Path, args: argparse.Namespace, evaluator: Any) -> dict[str, Any]:
    """Train ``family`` for ``args.seconds`` and evaluate it; returns the JSON record."""
    import pytorch_lightning as pl
    import torch

    from aigc import project_root
    from aigc.config import lightning_precision, load_config
    from aigc.data.captions_io import read_captions
    from aigc.data.loader import ShardDataModule
    from aigc.evaluation import evaluate_model
    from aigc.models import build_module
    from aigc.models.text import Tokenizer
    from aigc.training.trainer import build_trainer

    yaml_path = project_root() / "models" / f"{family}.yaml"
    # Lightning's own max_steps stays out of the way; the clock (max_time) ends training.
    schedule = f"trainer.max_steps={args.max_steps or 10_000_000}"
    cfg = load_config(yaml_path, overrides=[*args.set, schedule])
    if args.batch_size:
        cfg.data.batch_size = args.batch_size
    pl.seed_everything(cfg.trainer.seed, workers=True)
    tokenizer = Tokenizer.build(read_captions(data, "train"))
    module = build_module(cfg, tokenizer, cfg.data.image_size, cfg.data.channels)
    dm = ShardDataModule(cfg.data, location=data, seed=cfg.trainer.seed)
    use_gpu = torch.cuda.is_available() and not args.cpu
    if args.precision:
        cfg.trainer.precision = args.precision
    precision = lightning_precision(cfg.trainer.precision, use_gpu)  # what build_trainer uses
    timer = _step_timer()
    callbacks = [timer]
    if not args.max_steps:
        callbacks.append(_clock_schedule(module, args.seconds))
    # aigc train's Trainer settings, on one device, with no validation and the clock as the limit.
    trainer = build_trainer(
        module,
        cfg.trainer,
        use_gpu=use_gpu,
        callbacks=callbacks,
        max_time=timedelta(seconds=args.seconds),
        limit_val_batches=0,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    fit_seconds = time.perf_counter() - start
    steps = int(trainer.global_step)
    module.eval()
    result = evaluate_model(
        module, evaluator, data, num_samples=args.samples, seed=args.seed, batch_size=args.sample_batch_size
    )
    return {
        "family": family,
        "config": str(yaml_path.relative_to(project_root())),
        "overrides": args.set,
        "eval/cond_accuracy": result.get("eval/cond_accuracy"),
        "eval/fd": result["eval/fd"],
        "eval/fd_train_val": result["eval/fd_train_val"],
        "eval/clip_score": result["eval/clip_score"],
        "eval/diversity": result["eval/diversity"],
        "eval/copy_fraction": result["eval/copy_fraction"],
        "collapse": result["collapse"],
        "copying": result["copying"],
        "train_steps_per_s": timer.steps_per_s(steps),
        "sampling_images_per_s": result["perf/sampling_images_per_s"],
        "steps": steps,
        "seconds": round(fit_seconds, 1),
        "budget_seconds": args.seconds,
        "schedule_steps": module.trainer_cfg.max_steps,
        "schedule": "fixed" if args.max_steps else "clock",
        "precision": precision,
        "batch_size": cfg.data.batch_size,
        "threads": torch.get_num_threads(),
        "device": "cuda" if use_gpu else "cpu",
        "evaluator_hash": result["evaluator_hash"],
        "data_version": result["data_version"],
        "num_samples": result["num_samples"],
        "seed": result["seed"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", action="append", choices=FAMILIES, help="repeatable; default all")
    parser.add_argument("--seconds", type=float, default=300.0, help="training wall-clock budget per family")
    parser.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="fix the LR schedule's length (trainer.max_steps); default: fitted to the clock",
    )
    parser.add_argument(
        "--data", type=Path, default=None, help="digits shard folder; built in a temp dir if absent"
    )
    parser.add_argument("--samples", type=int, default=500, help="images generated for the evaluation")
    parser.add_argument("--sample-batch-size", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=None, help="override data.batch_size")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed of the evaluation")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default torch's)")
    parser.add_argument(
        "--cache-dir", type=Path, default=None, help="evaluator cache (default .cache/evaluators)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for every family, e.g. model.text.encoder=minilm (repeatable)",
    )
    parser.add_argument("--cpu", action="store_true", help="train on CPU even when CUDA is available")
    parser.add_argument(
        "--precision",
        choices=("32", "bf16-mixed", "16-mixed"),
        default=None,
        help="override trainer.precision (used on CUDA only)",
    )
    args = parser.parse_args(argv)

    import torch

    from aigc.config import DataConfig
    from aigc.data import dataset_path
    from aigc.evaluation import reference_evaluator

    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    tmp: tempfile.TemporaryDirectory | None = None
    data = args.data or dataset_path(DataConfig())
    if not (data / "manifest.json").is_file():
        from aigc.data import build_dataset

        if args.data is not None:
            print(f"error: {data}/manifest.json not found", file=sys.stderr)
            return 2
        tmp = tempfile.TemporaryDirectory(prefix="aigc-quality-")
        data = Path(tmp.name) / "digits"
        build_dataset(DataConfig(), data)
    start = time.perf_counter()
    evaluator = reference_evaluator(
        data, cache_dir=args.cache_dir, progress=lambda m: print(m, file=sys.stderr)
    )
    print(
        json.dumps(
            {
                "evaluator_hash": evaluator.hash,
                "data_version": evaluator.data_version,
                "evaluator_train_seconds": evaluator.info.get("train_seconds"),
                "evaluator_val_accuracy": evaluator.info.get("val_accuracy"),
                "evaluator_ready_seconds": round(time.perf_counter() - start, 1),
            }
        ),
        flush=True,
    )
    failed = 0
    try:
        # sd fine-tunes a pretrained pipeline folder: not a family to train from scratch here.
        for family in args.family or [f for f in FAMILIES if f != "sd"]:
            try:
                record = run_family(family, data, args, evaluator)
            except Exception as err:  # report and go on with the other families
                failed += 1
                record = {"family": family, "error": f"{type(err).__name__}: {err}"}
            print(json.dumps(record), flush=True)
    finally:
        if tmp is not None:
            tmp.cleanup()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

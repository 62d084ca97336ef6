"""Shared pieces of the training benchmarks: a dataset, the `aigc train` runner, a plain loop.

Not a benchmark itself. Every figure compares like with like: the same model, batch, data and
thread count on both sides (Ray sets a worker's OMP_NUM_THREADS to its CPU count, so the plain side
sets torch's threads explicitly).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
AIGC = str(Path(sys.executable).parent / "aigc")


def digits_dataset(work: Path) -> Path:
    """The digits shards, built into ``work`` (seconds)."""
    from aigc.config import DataConfig
    from aigc.data.shards import build_dataset

    out = work / "digits"
    if not (out / "manifest.json").exists():
        build_dataset(DataConfig(), out)
    return out


def bench_overrides(work: Path, dataset: Path, steps: int, workers: int, threads: int) -> list[str]:
    """Overrides that turn a shipped config into a timing run: nothing periodic but the metrics,
    logged every 10 steps as the shipped configs do (their timestamps time the steps; logging every
    step would time the benchmark's own logging too)."""
    return [
        f"data.location={dataset}",
        f"trainer.max_steps={steps}",
        "trainer.log_every_steps=10",
        f"trainer.val_every_steps={10 * steps}",
        f"trainer.sample_every_steps={10 * steps}",
        f"trainer.checkpoint_every_steps={10 * steps}",
        f"trainer.threads_per_worker={threads}",
        f"scaling.cpus_per_worker={threads}",
        f"scaling.num_workers={workers}",
        f"scaling.storage_path={work / 'runs'}",
        f"tracking.uri=sqlite:///{work / 'mlflow.db'}",
        "tracking.experiment=benchmarks",
        "tracking.system_metrics=false",
    ]


def run_aigc_train(
    config: Path, overrides: list[str], name: str, env: dict[str, str] | None = None
) -> tuple[str, str, float]:
    """Run the real CLI (in ``env``, default this process's); returns (tracking uri, run id, wall s)."""
    args = [AIGC, "train", str(config), "--name", name, "--no-eval", "--no-register"]
    for o in overrides:
        args += ["--set", o]
    uri = next(o.split("=", 1)[1] for o in overrides if o.startswith("tracking.uri="))
    t0 = time.time()
    out = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env)
    wall = time.time() - t0
    if out.returncode != 0:
        raise RuntimeError(f"aigc train failed:\n{out.stderr[-4000:]}")
    from mlflow.tracking import MlflowClient

    runs = MlflowClient(uri).search_runs(
        [MlflowClient(uri).get_experiment_by_name("benchmarks").experiment_id],
        f"tags.`aigc.run.name` = '{name}'",
    )
    return uri, runs[0].info.run_id, wall


def steady_seconds_per_step(uri: str, run_id: str, skip: int) -> float:
    """Seconds per step from the train/loss timestamps (taken when the rank logs them) after the
    first ``skip`` steps."""
    from mlflow.tracking import MlflowClient

    hist = sorted(MlflowClient(uri).get_metric_history(run_id, "train/loss"), key=lambda m: m.step)
    hist = [m for m in hist if m.step > skip]
    if len(hist) < 2:
        raise RuntimeError("too few logged steps to time")
    return (hist[-1].timestamp - hist[0].timestamp) / 1000 / (hist[-1].step - hist[0].step)


def plain_loop(config: Path, overrides: list[str], threads: int, steps: int, skip: int) -> dict[str, Any]:
    """The same model, batch and data in a plain PyTorch loop (no Lightning trainer, no Ray)."""
    import warnings

    import torch

    from aigc.config import load_config
    from aigc.data.captions_io import read_captions
    from aigc.data.loader import ShardDataModule
    from aigc.models import build_module
    from aigc.models.text import Tokenizer

    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    cfg = load_config(config, overrides)
    dataset = cfg.data.location
    torch.manual_seed(cfg.trainer.seed)
    module = build_module(
        cfg, Tokenizer.build(read_captions(dataset, "train")), cfg.data.image_size, cfg.data.channels
    )
    opt = torch.optim.AdamW(module.parameters(), lr=cfg.trainer.lr, weight_decay=cfg.trainer.weight_decay)
    dm = ShardDataModule(cfg.data, location=dataset, seed=cfg.trainer.seed)
    loader = dm.train_dataloader()  # one loader iterated every epoch, as Lightning does
    step, t_start, epoch = 0, None, 0
    while step < steps:
        dm.set_epoch(epoch)
        for i, batch in enumerate(loader):
            if step == skip:
                t_start = time.perf_counter()
            loss = module.training_step(batch, i)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.trainer.grad_clip:
                torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.trainer.grad_clip)
            opt.step()
            if hasattr(module, "update_ema"):
                module.update_ema()
            step += 1
            if step >= steps:
                break
        epoch += 1
    per_step = (time.perf_counter() - t_start) / (steps - skip)
    return {"seconds_per_step": per_step, "samples_per_s": cfg.data.batch_size / per_step}


def start_embedded_ray() -> None:
    """Start Ray in this process as ``aigc train`` starts its embedded instance (loopback, no
    dashboard; see ``aigc.training.cluster``), for the bare-stack sides that must differ from
    ``aigc train`` only by what aigc adds."""
    import ray
    from ray._private import ray_constants

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray_constants.ENABLE_RAY_CLUSTER = False
    ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False)


def workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="aigc-bench-"))


def thread_env(threads: int) -> None:
    os.environ["OMP_NUM_THREADS"] = str(threads)

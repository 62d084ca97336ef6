"""Shared pieces of the training benchmarks: a dataset, the `aigc train` runner, a plain loop.

Not a benchmark itself. Every figure compares like with like: the same model, batch, data and
thread count on both sides (Ray sets a worker's OMP_NUM_THREADS to its CPU count, so the plain side
sets torch's threads explicitly).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import statistics
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
    from aigc.data.build import build_dataset

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


def plain_loop(
    config: Path, overrides: list[str], threads: int, steps: int, skip: int, ddp: bool = False
) -> dict[str, Any]:
    """The same model, batch and data in a plain PyTorch loop (no Lightning trainer, no Ray).

    ``ddp``: this process is one rank of an initialised ``torch.distributed`` group; the module is
    wrapped in ``DistributedDataParallel`` (gradients averaged in buckets during the backward, as
    Lightning's DDP strategy does) and the DataModule reads this rank's shards."""
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
    step_fn = module.training_step
    if ddp:

        class TrainingStep(torch.nn.Module):
            """DDP syncs in the backward of what its forward returned, so its forward is the training
            step, as in Lightning's wrapper of a LightningModule."""

            def __init__(self) -> None:
                super().__init__()
                self.inner = module

            def forward(self, batch, batch_idx):
                return self.inner.training_step(batch, batch_idx)

        step_fn = torch.nn.parallel.DistributedDataParallel(TrainingStep())
    dm = ShardDataModule(cfg.data, location=dataset, seed=cfg.trainer.seed)
    loader = dm.train_dataloader()  # one loader iterated every epoch, as Lightning does
    step, t_start, epoch = 0, None, 0
    while step < steps:
        dm.set_epoch(epoch)
        for i, batch in enumerate(loader):
            if step == skip:
                t_start = time.perf_counter()
            loss = step_fn(batch, i)
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


def _run_script(name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name(name)), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _loop_args(
    config: Path, overrides: list[str], threads: int, steps: int, skip: int, out: Path
) -> list[str]:
    args = ["--config", str(config), "--out", str(out), "--threads", str(threads)]
    return args + ["--steps", str(steps), "--skip", str(skip)] + [f"--set={o}" for o in overrides]


def _results(procs: list[tuple[subprocess.Popen, Path]], what: str) -> list[dict[str, Any]]:
    """Wait for every process, then each one's JSON; a failure raises with its stderr's tail."""
    errors = [proc.communicate()[1] for proc, _ in procs]
    for (proc, out), err in zip(procs, errors, strict=True):
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(f"{what} failed:\n{err[-4000:]}")
    return [json.loads(out.read_text()) for _, out in procs]


def ray_plain_loop(
    config: Path,
    overrides: list[str],
    threads: int,
    steps: int,
    skip: int,
    work: Path,
    tag: str,
    workers: int = 1,
) -> dict[str, Any]:
    """The plain loop in bare Ray Train V2 workers (``ray_plain_loop.py``; DDP when ``workers`` > 1):
    rank 0's ``seconds_per_step`` and ``samples_per_s``."""
    out = work / f"ray-plain-{tag}.json"
    args = _loop_args(config, overrides, threads, steps, skip, out)
    args += ["--workers", str(workers), "--storage", str(work / "ray-plain-runs")]
    return _results([(_run_script("ray_plain_loop.py", args), out)], "ray_plain_loop.py")[0]


def plain_processes(
    config: Path, overrides: list[str], threads: int, steps: int, skip: int, work: Path, tag: str, ddp: bool
) -> list[dict[str, Any]]:
    """Two plain loops started at once, each in its own process (``plain_process.py``): independent,
    or the two ranks of one DDP job over gloo on 127.0.0.1. Each one's figures.

    Independent processes start and stop apart by up to a second or so: in that time one runs
    alone, which flatters their sum by a little (a second of 20-30 timed)."""
    import socket

    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        out = work / f"plain-process-{tag}-{rank}.json"
        args = _loop_args(config, overrides, threads, steps, skip, out) + (["--ddp"] if ddp else [])
        env = os.environ | {"RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}
        env["MASTER_PORT"] = str(port)
        procs.append((_run_script("plain_process.py", args, env if ddp else None), out))
    return _results(procs, "plain_process.py")


def median_ratio(a: list[float], b: list[float]) -> float:
    """The median of the rounds' ratios a/b: each round's sides ran back to back."""
    return round(statistics.median(x / y for x, y in zip(a, b, strict=True)), 3)


def start_embedded_ray() -> None:
    """Start Ray in this process as ``aigc train`` starts its embedded instance (loopback, no
    dashboard; see ``aigc.cluster``), for the bare-stack sides that must differ from
    ``aigc train`` only by what aigc adds."""
    import ray
    from ray._private import ray_constants

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray_constants.ENABLE_RAY_CLUSTER = False
    ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False)


def workdir() -> Path:
    """A scratch folder for this run (data, MLflow store, checkpoints; about 25 MB), removed when
    the process exits: each run left one in /tmp. ``AIGC_BENCH_KEEP=1`` keeps it and prints where."""
    path = Path(tempfile.mkdtemp(prefix="aigc-bench-"))
    if os.environ.get("AIGC_BENCH_KEEP") == "1":
        print(f"benchmark files kept in {path}", file=sys.stderr)
    else:
        atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def thread_env(threads: int) -> None:
    os.environ["OMP_NUM_THREADS"] = str(threads)

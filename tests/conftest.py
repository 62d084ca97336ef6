"""Shared fixtures. Expensive ones are session-scoped and built once."""

from __future__ import annotations

from pathlib import Path

import pytest

from tiny import TINY


@pytest.fixture(scope="session")
def digits_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits shards built with the default DataConfig (8x8, 100 per shard); read-only."""
    from aigc.config import DataConfig
    from aigc.data import build_dataset

    out = tmp_path_factory.mktemp("datasets") / "digits"
    build_dataset(DataConfig(), out)
    return out


@pytest.fixture(scope="session", autouse=True)
def shared_evaluator_cache(tmp_path_factory: pytest.TempPathFactory):
    """Every evaluator a test trains, directly or through `aigc train`'s final evaluation, lands in
    one session folder (the one tests/quality/conftest.py uses), so the suite trains it once and
    never writes the project's own .cache/."""
    import os

    cache = tmp_path_factory.getbasetemp() / "reference-evaluators"
    old = os.environ.get("AIGC_EVALUATOR_CACHE")
    os.environ["AIGC_EVALUATOR_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("AIGC_EVALUATOR_CACHE", None)
    else:
        os.environ["AIGC_EVALUATOR_CACHE"] = old


@pytest.fixture
def bar_batch():
    """Factory of a fixed, easy batch: ``n`` 8x8 grey images, a bright column per class on -1
    (class-dependent bars, so real images are easy to tell from fakes and from each other), little
    noise, digits captions, labels and an all-valid mask. Deterministic."""
    import torch

    from aigc.data.captions import digit_caption

    def make(n: int = 16) -> dict:
        g = torch.Generator().manual_seed(0)
        labels = [i % 10 for i in range(n)]
        images = -torch.ones(n, 1, 8, 8)
        for i, label in enumerate(labels):
            images[i, 0, :, label % 8] = 1.0
        images += 0.05 * torch.randn(images.shape, generator=g)
        return {
            "image": images,
            "caption": [digit_caption(lab, f"k{i}") for i, lab in enumerate(labels)],
            "label": torch.tensor(labels),
            "valid": torch.ones(n, dtype=torch.bool),
        }

    return make


#: `aigc quickstart` options that keep a test's quickstart short: a tiny diffusion model, 1 worker,
#: 40 steps, 100 evaluation samples (the command and every step are the real ones).
QUICKSTART_TEST_ARGS = [
    "--steps=40",
    "--workers=1",
    "--eval-samples=100",
    *(
        f"--set={kv}"
        for kv in (
            *TINY["diffusion"],
            # The quickstart's own: two text layers (the default) and 8 sampling steps.
            "model.text.layers=2",
            "model.sample_steps=8",
            "data.batch_size=32",
            "data.num_workers=0",
            "trainer.warmup_steps=2",
            "trainer.log_every_steps=2",
            "trainer.val_every_steps=20",
            "trainer.limit_val_batches=1",
            "trainer.sample_every_steps=20",
            "trainer.checkpoint_every_steps=40",
        )
    ),
]


@pytest.fixture(scope="session")
def quickstart_project(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A project folder after a real `aigc quickstart` (subprocess, embedded Ray, sqlite MLflow store
    in <project>/mlflow/): used by the quickstart test and by the dashboard's browser test. Returns
    ``{"root", "env", "args", "output", "seconds"}`` (``args``: the command's options)."""
    import os
    import shutil
    import subprocess
    import sys
    import time

    project = Path(__file__).resolve().parents[1]
    root = tmp_path_factory.mktemp("quickstart-project")
    shutil.copytree(project / "models", root / "models")
    shutil.copy(project / "params.yaml", root / "params.yaml")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(AIGC_PROJECT_ROOT=str(root), OMP_NUM_THREADS="1")
    aigc = str(Path(sys.executable).parent / "aigc")
    start = time.perf_counter()
    proc = subprocess.run(
        [aigc, "quickstart", *QUICKSTART_TEST_ARGS], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"aigc quickstart failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    seconds = time.perf_counter() - start
    return {"root": root, "env": env, "args": QUICKSTART_TEST_ARGS, "output": proc.stdout, "seconds": seconds}


@pytest.fixture(scope="session")
def asha_sweep(digits_dataset: Path, tmp_path_factory: pytest.TempPathFactory):
    """One real `aigc sweep` per session (4 ASHA trials, killed mid-way, then `--resume
    --register-best`) into a sqlite store, for tests/integration/test_sweep.py and the compare view's
    browser test; read-only. Returns ``sweep_scenario.SweepScenario``."""
    from sweep_scenario import run_asha_sweep

    return run_asha_sweep(tmp_path_factory.mktemp("asha-sweep"), digits_dataset)

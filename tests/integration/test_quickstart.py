"""`aigc quickstart` end to end, as a new user runs it (with a shrunken budget): every artefact it
promises, and a second run that reuses what is built and says so."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image
from typer.testing import CliRunner

from aigc.cli import app
from aigc.data import read_manifest, verify_dataset
from aigc.data.preview import iter_samples
from aigc.workflows.quickstart import DIGIT_PROMPTS, GRID_COLUMNS, QUICKSTART_DATA, STEPS

AIGC = str(Path(sys.executable).parent / "aigc")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_quickstart_builds_trains_registers_promotes_and_draws_the_grid(quickstart_project):
    root, out = quickstart_project["root"], quickstart_project["output"]
    # Every step says what it does and how long it took.
    # The reference evaluator lives in the session's shared cache (tests/conftest.py): a test that ran
    # before this one may have trained it, and the quickstart then says it reused it.
    for i, name in enumerate(STEPS, 1):
        verb = "(done|reused)" if name == "reference evaluator" else "done"
        assert re.search(rf"^\[{i}/{len(STEPS)}\] {name}: {verb} in [0-9.]+ s$", out, re.M), out
    dataset = root / "datasets" / "digits"
    assert verify_dataset(dataset).ok

    state = json.loads((root / "outputs" / "quickstart" / "diffusion.json").read_text())
    client = MlflowClient(f"sqlite:///{root / 'mlflow' / 'mlflow.db'}")
    run = client.get_run(state["run_id"])
    assert run.info.status == "FINISHED" and run.data.metrics["eval/fd"] > 0
    production = client.get_model_version_by_alias("aigc-diffusion", "production")
    assert production.run_id == state["run_id"] and str(production.version) == str(state["version"])
    assert f"aigc-diffusion v{production.version}, promoted" in out

    grid = root / "outputs" / "quickstart" / "diffusion-samples.png"
    assert f"samples    {grid}" in out
    with Image.open(grid) as img:
        # image_grid: 8x8 samples drawn 4x (32 px) with 1 px gaps: one row per digit prompt.
        assert img.size == (GRID_COLUMNS * 33 + 1, len(DIGIT_PROMPTS) * 33 + 1)
    for command in ("aigc ui", "aigc serve aigc-diffusion@production", "aigc generate --model"):
        assert command in out


def test_a_second_quickstart_reuses_everything_but_the_grid(quickstart_project):
    root, env, args = quickstart_project["root"], quickstart_project["env"], quickstart_project["args"]
    runs = sorted(p.name for p in (root / "runs").iterdir())
    grid = root / "outputs" / "quickstart" / "diffusion-samples.png"
    before = grid.read_bytes()
    proc = subprocess.run([AIGC, "quickstart", *args], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for i, name in enumerate(STEPS[:-1], 1):
        assert re.search(rf"^\[{i}/{len(STEPS)}\] {name}: reused in", proc.stdout, re.M), proc.stdout
    assert "is production already" in proc.stdout
    assert sorted(p.name for p in (root / "runs").iterdir()) == runs  # no new training
    assert grid.read_bytes() == before  # same production model, same seed: the same grid


def test_only_a_finished_run_of_the_same_config_is_reused(quickstart_project):
    """What a second quickstart reuses is decided by the recorded config digest and the run's state."""
    from aigc.workflows.quickstart import _recorded_run

    root = quickstart_project["root"]
    state = json.loads((root / "outputs" / "quickstart" / "diffusion.json").read_text())
    client = MlflowClient(f"sqlite:///{root / 'mlflow' / 'mlflow.db'}")
    assert _recorded_run(client, state, state["digest"]).info.run_id == state["run_id"]
    assert _recorded_run(client, state, "another-config") is None
    assert _recorded_run(client, {**state, "run_id": "0" * 32}, state["digest"]) is None  # not in this store


def test_quickstart_rejects_an_unknown_family(tmp_path):
    proc = subprocess.run(
        [AIGC, "quickstart", "--family", "gann"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2 and "diffusion, gan, vae, autoregressive" in proc.stderr


def test_quickstart_rejects_an_unknown_dataset():
    result = CliRunner().invoke(app, ["quickstart", "--data", "emojis", "--no-train"])
    assert result.exit_code == 2 and "--data 'emojis': allowed: digits, emoji" in result.output


def test_quickstart_data_emoji_builds_then_verifies_emoji32(tmp_path):
    """--data emoji --no-train: the data step alone (the training is the same code path as digits)."""
    env = {"AIGC_PROJECT_ROOT": str(tmp_path)}
    args = ["quickstart", "--data", "emoji", "--no-train"]
    first = CliRunner().invoke(app, args, env=env)
    assert first.exit_code == 0, first.output
    dataset = tmp_path / "datasets" / "emoji32"
    manifest = read_manifest(dataset)
    assert (manifest["source"]["type"], manifest["image_size"], manifest["channels"]) == ("openmoji", 32, 3)
    assert f"building emoji32 into {dataset}" in first.output
    assert (tmp_path / "outputs" / "quickstart" / "emoji32-preview.png").is_file()
    # The grid's prompts are captions of the set (the model has seen them in training).
    captions = {s.caption for s in iter_samples(dataset)}
    assert set(QUICKSTART_DATA["emoji"].prompts) <= captions
    second = CliRunner().invoke(app, args, env=env)
    assert second.exit_code == 0 and "exists; verifying" in second.output
    assert not (tmp_path / "datasets" / "digits").exists()

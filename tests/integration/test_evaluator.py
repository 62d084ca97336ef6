"""The reference evaluator on the real digits shards: it tells real images from noise, flags copies
and collapse, and ``evaluate_model`` / ``aigc evaluate`` measure a real (untrained) model.

The evaluator is trained once per session (about a minute) into the session's temp folder, the
same cache the quality tests' ``reference_evaluator`` fixture uses, so the suite pays for it once.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from aigc.data.captions import heldout_captions
from aigc.evaluation import comparable, evaluate_images, evaluate_model
from aigc.evaluation import reference_evaluator as make_evaluator
from aigc.evaluation.data import read_split

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def evaluator(digits_dataset: Path, tmp_path_factory: pytest.TempPathFactory):
    # Same folder as tests/quality/conftest.py's fixture: whichever runs first trains it.
    return make_evaluator(digits_dataset, cache_dir=tmp_path_factory.getbasetemp() / "reference-evaluators")


@pytest.fixture(scope="module")
def splits(digits_dataset: Path):
    return read_split(digits_dataset, "train"), read_split(digits_dataset, "val")


def _prompts(labels: torch.Tensor) -> list[str]:
    return [heldout_captions(int(label)) for label in labels]


def test_classifier_reaches_97_percent_on_val_and_evaluator_is_saved(evaluator, digits_dataset):
    assert evaluator.info["val_accuracy"] >= 0.97
    assert evaluator.data_version == json.loads((digits_dataset / "manifest.json").read_text())["digest"]
    assert evaluator.path.name == evaluator.data_version and len(evaluator.hash) == 64


def test_real_images_score_low_fd_and_high_accuracy(evaluator, digits_dataset, splits):
    train, val = splits
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(5))[:500]
    real = evaluate_images(
        train.images[idx],
        _prompts(train.labels[idx]),
        train.labels[idx],
        evaluator,
        dataset_dir=digits_dataset,
    )
    assert real["eval/fd"] < 1.5 * real["eval/fd_train_val"]
    on_val = evaluate_images(
        val.images, _prompts(val.labels), val.labels, evaluator, dataset_dir=digits_dataset
    )
    assert on_val["eval/cond_accuracy"] >= 0.97
    assert on_val["eval/clip_score"] > 40  # held-out phrasing, real images: well aligned
    assert not on_val["collapse"] and not on_val["copying"]


def test_noise_scores_high_fd_and_chance_accuracy(evaluator, digits_dataset):
    g = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (500, 1, 8, 8), generator=g, dtype=torch.uint8)
    labels = torch.arange(500) % 10
    result = evaluate_images(noise, _prompts(labels), labels, evaluator, dataset_dir=digits_dataset)
    assert result["eval/fd"] > 10 * result["eval/fd_train_val"]
    assert 0.02 <= result["eval/cond_accuracy"] <= 0.2
    assert result["eval/clip_score"] < result["eval/clip_score_val"] - 30
    assert not result["copying"]


def test_copies_of_training_images_are_flagged(evaluator, digits_dataset, splits):
    train, val = splits
    idx = torch.arange(500)
    copies = evaluate_images(
        train.images[idx],
        _prompts(train.labels[idx]),
        train.labels[idx],
        evaluator,
        dataset_dir=digits_dataset,
    )
    assert copies["copying"] and copies["eval/copy_fraction"] > 0.95
    unseen = evaluate_images(
        val.images, _prompts(val.labels), val.labels, evaluator, dataset_dir=digits_dataset
    )
    assert not unseen["copying"] and unseen["eval/copy_fraction"] <= 0.05


def test_one_image_repeated_is_flagged_as_collapse(evaluator, digits_dataset, splits):
    _, val = splits
    labels = torch.arange(500) % 10
    one = val.images[:1].repeat(500, 1, 1, 1)
    result = evaluate_images(one, _prompts(labels), labels, evaluator, dataset_dir=digits_dataset)
    assert result["collapse"] and result["eval/diversity"] < 0.01
    # One fixed image per class is collapse too, even though every class is right.
    per_class = torch.stack([val.images[val.labels == c][0] for c in range(10)])[labels]
    result = evaluate_images(per_class, _prompts(labels), labels, evaluator, dataset_dir=digits_dataset)
    assert result["collapse"]


def test_evaluate_model_is_deterministic_and_the_cli_reports_the_same(evaluator, digits_dataset, tmp_path):
    from aigc.cli import app
    from aigc.config import load_config
    from aigc.data.captions_io import read_captions
    from aigc.models import build_module
    from aigc.models.export import export_model
    from aigc.models.text import Tokenizer

    cfg = load_config(Path(__file__).parents[2] / "models" / "vae.yaml")
    torch.manual_seed(0)
    module = build_module(cfg, Tokenizer.build(read_captions(digits_dataset, "train")), 8, 1)
    a = evaluate_model(module, evaluator, digits_dataset, num_samples=60, seed=1, batch_size=25)
    b = evaluate_model(module, evaluator, digits_dataset, num_samples=60, seed=1, batch_size=25)
    c = evaluate_model(module, evaluator, digits_dataset, num_samples=60, seed=2, batch_size=25)
    assert a["eval/fd"] == b["eval/fd"] and comparable(a, b)
    assert a["eval/fd"] != c["eval/fd"] and not comparable(a, c)
    assert a["family"] == "vae" and a["prompts"] == "heldout" and a["num_samples"] == 60
    assert 0.0 <= a["eval/cond_accuracy"] <= 1.0

    export = export_model(module, tmp_path / "export")
    out = tmp_path / "result.json"
    cache = evaluator.path.parent
    args = [
        "evaluate",
        str(export),
        "--data",
        str(digits_dataset),
        "-n",
        "60",
        "--seed",
        "1",
        "--batch-size",
        "25",
        "--json",
        str(out),
        "--cache-dir",
        str(cache),
    ]
    # --run records the figures in an MLflow run, as aigc train's final evaluation does (one
    # function: aigc.evaluation.final), with the provenance that makes them comparable.
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    from aigc.tracking import start_job_run

    run_id = start_job_run(uri, "evaluate-test")
    args += ["--run", run_id, "--tracking-uri", uri, "--threads", "1"]
    run = CliRunner().invoke(app, args)
    assert run.exit_code == 0, run.output
    assert "eval/fd" in run.output and "evaluator_hash" in run.output
    assert "evaluating: 60 samples (seed 1)" in run.output  # progress (stderr is mixed in)
    written = json.loads(out.read_text())
    assert written["eval/fd"] == pytest.approx(a["eval/fd"], rel=1e-9) and comparable(written, a)
    recorded = MlflowClient(uri).get_run(run_id).data
    assert recorded.metrics["eval/fd"] == pytest.approx(a["eval/fd"], rel=1e-9)
    assert recorded.metrics["eval/cond_accuracy"] == pytest.approx(a["eval/cond_accuracy"])
    assert recorded.tags["aigc.eval.evaluator_hash"] == a["evaluator_hash"]
    assert recorded.tags["aigc.eval.num_samples"] == "60" and recorded.tags["aigc.eval.seed"] == "1"

    bad = CliRunner().invoke(
        app,
        [
            "evaluate",
            str(export),
            "--data",
            str(digits_dataset),
            "-n",
            "10",
            "--cache-dir",
            str(cache),
            "--set",
            "steps=3",
        ],
    )
    assert bad.exit_code == 2 and "temperature" in bad.output  # names the VAE's allowed option
    missing = CliRunner().invoke(app, ["evaluate", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "nope" in missing.output

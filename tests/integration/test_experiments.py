"""Evaluation during training and the checkpoint a run keeps and registers, on the embedded Ray.

A run with ``trainer.eval_every_steps`` has each N-th checkpoint measured by a Ray Train validation
task beside the worker (``aigc.training.validation``); Ray keeps the best
``trainer.keep_best_checkpoints`` by ``trainer.checkpoint_metric`` plus the newest; the run's model,
what ``aigc train`` registers and the gate compares, is the best. The run here warms its learning
rate up to one far too high, so its samples get worse as it trains: its best checkpoint is an early
one, never the last. (The same retention on the loopback S3 store: ``test_s3.py``.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from aigc.contract import EVAL_FILE, EVAL_GRID_KEY, TAG_CHECKPOINT_STEP
from tiny import TINY

pytestmark = pytest.mark.slow


def overrides(tmp: Path, dataset: Path, steps: int) -> list[str]:
    """A tiny diffusion run on one worker (the evaluation task takes the embedded Ray's other CPU),
    a checkpoint every 5 steps, an evaluation every 10, and a learning rate warmed up to 0.05 (Adam):
    the samples get worse from the first evaluation on."""
    return [
        "model.family=diffusion",
        *TINY["diffusion"],
        f"data.location={dataset}",
        "data.batch_size=32",
        "data.num_workers=0",
        f"trainer.max_steps={steps}",
        "trainer.lr=0.05",
        "trainer.warmup_steps=30",
        "trainer.log_every_steps=5",
        "trainer.val_every_steps=10",
        "trainer.limit_val_batches=1",
        "trainer.sample_every_steps=10",
        "trainer.checkpoint_every_steps=5",
        "trainer.eval_every_steps=10",
        "trainer.keep_best_checkpoints=2",
        "scaling.num_workers=1",
        f"scaling.storage_path={tmp / 'runs'}",
        f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}",
        "tracking.experiment=experiments",
        "tracking.system_metrics=false",
    ]


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def kept(run_dir: Path) -> list[int]:
    return sorted(int(p.name.removeprefix("checkpoint-step")) for p in run_dir.glob("checkpoint-step*"))


@pytest.mark.timeout(900)
def test_the_best_checkpoint_is_kept_registered_and_named_when_the_samples_get_worse(
    ray_local, digits_dataset, tmp_path, capsys
):
    from aigc.registry.catalog import format_lineage, lineage
    from aigc.registry.versions import load_version
    from aigc.training import train
    from aigc.training.launcher import TrainResult
    from aigc.workflows.train import train_and_register

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_dir = tmp_path / "runs" / "worse"
    result: TrainResult = train_and_register(
        None, overrides(tmp_path, digits_dataset, 30), name="worse", eval_samples=64
    )
    said = capsys.readouterr().err

    # Evaluated at steps 10, 20 and 30 while training went on: one figure per step, and the grid.
    fd = history(client, result.run_id, "eval/fd")
    assert [s for s, _ in fd] == [10, 20, 30], fd
    assert [s for s, _ in history(client, result.run_id, "eval/clip_score")] == [10, 20, 30]
    grids = [a.path for a in client.list_artifacts(result.run_id, "images")]
    for step in (10, 20, 30):
        assert any(f"{EVAL_GRID_KEY}+step+{step}+" in p for p in grids), grids
    run = client.get_run(result.run_id)
    assert run.data.tags["aigc.eval.num_samples"] == "64"
    assert run.data.tags["aigc.eval.data_version"] == run.data.tags["aigc.data.version"]

    # The samples got worse: the best is step 10. Ray kept the best 2 of the evaluated checkpoints
    # and the newest; the unevaluated ones (5, 15, 25) and nothing else were deleted.
    by_fd = sorted(fd, key=lambda item: item[1])
    best_step = by_fd[0][0]
    assert best_step != 30 and fd[-1][1] > by_fd[0][1], fd
    assert kept(run_dir) == sorted({by_fd[0][0], by_fd[1][0], 30}) == [10, 20, 30]
    for step, value in fd:  # each kept checkpoint holds its own report
        report = json.loads((run_dir / f"checkpoint-step{step:08d}" / EVAL_FILE).read_text())
        assert report["eval/fd"] == pytest.approx(value)

    # The run's model is the best checkpoint: its figures are the run's, the registered version is it.
    assert result.checkpoint_step == best_step and result.global_step == 30
    assert result.checkpoint == str(run_dir / f"checkpoint-step{best_step:08d}" / "checkpoint.ckpt")
    assert result.eval["eval/fd"] == pytest.approx(by_fd[0][1])
    assert not [k for k in result.metrics if k.startswith("eval/")]  # the last checkpoint's are not the run's
    assert f"the run's model is the checkpoint of step {best_step}" in said, said[-2000:]
    assert run.data.tags[TAG_CHECKPOINT_STEP] == str(best_step)
    name, number = result.registered.split("/")
    version = client.get_model_version(name, number)
    assert version.tags[TAG_CHECKPOINT_STEP] == str(best_step)
    assert float(version.tags["eval/fd"]) == pytest.approx(by_fd[0][1])
    assert version.tags["aigc.gate.eligible"] == "true"
    from aigc.models.export import load_model

    served = load_version(client, version).generate(["a handwritten digit three"], num_samples=4, seed=1)
    trained = load_model(result.checkpoint).generate(["a handwritten digit three"], num_samples=4, seed=1)
    assert (served == trained).all()
    chain = format_lineage(lineage(f"{name}/{number}", uri))
    assert f"(this model: step {best_step})" in chain, chain

    # Resumed after the deletions: from the newest checkpoint, the ranking kept.
    more = train(
        None, overrides(tmp_path, digits_dataset, 40), resume="worse", eval_samples=64, messages=None
    )
    assert more.global_step == 40
    assert [s for s, _ in history(client, result.run_id, "train/resumed_from_step")] == [30]
    assert history(client, result.run_id, "train/resumed_from_step")[0][1] == 30.0
    fd = history(client, result.run_id, "eval/fd")
    assert [s for s, _ in fd] == [10, 20, 30, 40], fd
    best_two = {s for s, _ in sorted(fd, key=lambda item: item[1])[:2]}
    assert kept(run_dir) == sorted(best_two | {40}), (kept(run_dir), fd)
    assert more.checkpoint_step == min(fd, key=lambda item: item[1])[0]

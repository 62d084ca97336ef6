"""The one Trainer builder (aigc.training.trainer.build_trainer): the rules every caller shares; the
driver's inputs that need no Ray: the training request and the run folder's complete and final
checkpoints; and the checkpoint upload a worker hands Ray (on Ray's own StorageContext, no Ray
started)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from aigc.config import ConfigError, TrainerConfig, load_config
from aigc.models import build_module
from aigc.models.text import Tokenizer
from aigc.training.trainer import build_trainer

ROOT = Path(__file__).resolve().parents[2]


def _module(family: str, *overrides: str):
    cfg = load_config(ROOT / "models" / f"{family}.yaml", list(overrides))
    tokenizer = Tokenizer.build(["a handwritten digit one", "the digit 2"])
    return build_module(cfg, tokenizer, cfg.data.image_size, cfg.data.channels)


def test_automatic_optimisation_takes_clipping_and_accumulation_from_the_config() -> None:
    vae = _module("vae", "trainer.grad_clip=0.5", "trainer.accumulate_grad_batches=3")
    trainer = build_trainer(vae)
    assert trainer.gradient_clip_val == 0.5
    assert trainer.accumulate_grad_batches == 3
    assert trainer.max_steps == vae.trainer_cfg.max_steps


def test_manual_optimisation_gets_no_lightning_clipping_or_accumulation() -> None:
    # The GAN steps its own two optimisers and clips itself; Lightning refuses accumulation then.
    gan = _module("gan", "trainer.grad_clip=0.5", "trainer.accumulate_grad_batches=3")
    assert not gan.automatic_optimization
    trainer = build_trainer(gan)
    assert trainer.gradient_clip_val is None
    assert trainer.accumulate_grad_batches == 1


def test_validation_runs_every_n_optimiser_steps_not_per_epoch() -> None:
    module = _module("diffusion", "trainer.val_every_steps=7", "trainer.limit_val_batches=3")
    trainer = build_trainer(module)
    assert trainer.val_check_interval == 7
    assert trainer.check_val_every_n_epoch is None
    assert trainer.limit_val_batches == 3
    assert trainer.num_sanity_val_steps == 0


def test_an_explicit_config_and_overrides_win() -> None:
    module = _module("vae")
    tc = TrainerConfig(max_steps=11, grad_clip=None)
    trainer = build_trainer(module, tc, limit_val_batches=0)
    assert trainer.max_steps == 11
    assert trainer.gradient_clip_val is None
    assert trainer.limit_val_batches == 0


def test_bf16_is_ignored_with_a_warning_on_cpu() -> None:
    module = _module("vae", "trainer.precision=bf16-mixed")
    with pytest.warns(UserWarning, match="trainer.precision=bf16-mixed ignored on CPU"):
        trainer = build_trainer(module)
    assert trainer.precision == "32-true"


def test_the_quiet_defaults_leave_logging_and_checkpoints_to_aigc() -> None:
    module = _module("vae")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = build_trainer(module)
    assert trainer.logger is None
    assert trainer.checkpoint_callback is None
    assert trainer.progress_bar_callback is None


def test_trainer_monitor_is_no_longer_a_silent_key() -> None:
    # It was read by nothing; under extra="forbid" a key that does nothing is an error now.
    with pytest.raises(ConfigError, match="trainer.monitor"):
        load_config(None, ["trainer.monitor=val/loss"])


# ---------------------------------------------------------------- the request and the run folder


def test_the_request_is_the_one_declaration_of_the_train_options() -> None:
    """`aigc train`'s flags take their defaults and help from TrainRequest, and every field but the
    config (an argument) is a flag: a new option is declared once."""
    import dataclasses

    import typer
    import typer.main

    from aigc.cli import train as train_cmd
    from aigc.cli.common import declared_field
    from aigc.contract import DEFAULT_EVAL_SAMPLES
    from aigc.training import TrainRequest

    app = typer.Typer()
    train_cmd.register(app)
    command = typer.main.get_command(app)
    by_name = {p.name: p for p in command.params}
    for f in dataclasses.fields(TrainRequest):
        param = by_name[f.name]
        default, help_text = declared_field(TrainRequest, f.name)
        assert (param.default, param.help) == (default, help_text), f.name
    assert declared_field(TrainRequest, "eval_samples")[0] == DEFAULT_EVAL_SAMPLES
    assert by_name["overrides"].opts == ["--set"]


def test_a_resume_keeps_the_jobs_config_under_the_options_given_now() -> None:
    from aigc.config import load_config
    from aigc.training import TrainError, TrainJob, TrainRequest

    cfg = load_config(ROOT / "models" / "vae.yaml", ["trainer.max_steps=7"])
    saved = TrainJob(
        name="v",
        run_id="r",
        experiment_id="1",
        tracking_uri="sqlite:///x.db",
        run=cfg,
        tokenizer={},
        image_size=8,
        channels=1,
        data_location="/d",
        data_version="v1",
        run_dir="/runs/v",
        sample_prompts=[""],
        allow_modified_data=True,
    )
    request = TrainRequest.of(None, ["trainer.max_steps=20"], resume="v", workers=3)
    resumed = request.continuing(saved).run_config()
    assert resumed.model.family == "vae"  # the job's config, not the default one
    assert (resumed.trainer.max_steps, resumed.scaling.num_workers) == (20, 3)
    assert cfg.trainer.max_steps == 7  # the record's config is left as it was
    assert request.continuing(saved).allow_modified_data  # once allowed, kept
    with pytest.raises(TrainError, match="--name and --resume exclude each other"):
        TrainRequest(name="a", resume="b")
    with pytest.raises(TypeError):
        TrainRequest.of(request, ["x=1"])


def _checkpoint_folder(run_dir: Path, step: int, sizes: dict[str, int] | None = None) -> Path:
    """A checkpoint folder as StepCheckpoint writes it: each file ``sizes[name]`` bytes (8 unless
    given; None leaves the file out)."""
    from aigc.contract import CHECKPOINT_FILES, checkpoint_dir_name

    folder = run_dir / checkpoint_dir_name(step)
    folder.mkdir(parents=True)
    for name in CHECKPOINT_FILES:
        size = (sizes or {}).get(name, 8)
        if size is not None:
            (folder / name).write_bytes(b"x" * size)
    return folder


def test_the_final_checkpoint_is_the_newest_complete_step_folder(tmp_path: Path) -> None:
    from aigc.contract import CHECKPOINT_NAME, STEP_FILE, checkpoint_dir_name
    from aigc.training.job import complete_checkpoints, final_checkpoint

    run_dir = tmp_path / "run"
    assert final_checkpoint(str(run_dir)) is None and complete_checkpoints(str(run_dir)) == []
    for step in (100, 20, 1000):
        _checkpoint_folder(run_dir, step)
    (run_dir / f"{checkpoint_dir_name(5000)}.tmp").write_text("")  # a file, not a checkpoint
    # Newer folders cut short by a storage outage: a file missing, a file left empty, nothing.
    _checkpoint_folder(run_dir, 2000, {CHECKPOINT_NAME: None})
    _checkpoint_folder(run_dir, 3000, {CHECKPOINT_NAME: 0})
    _checkpoint_folder(run_dir, 4000, {STEP_FILE: 0})
    (run_dir / checkpoint_dir_name(4500)).mkdir()
    expected = [f"{run_dir}/{checkpoint_dir_name(step)}" for step in (20, 100, 1000)]  # newest last
    assert complete_checkpoints(f"{run_dir}/") == expected
    assert final_checkpoint(f"{run_dir}/") == f"{expected[-1]}/{CHECKPOINT_NAME}"


def _cut_uploads(cuts: int):
    """A pyarrow filesystem on local files whose first ``cuts`` writes of a checkpoint file keep its
    first 100 bytes only and report no error: what pyarrow's S3 output stream did when S3 went away
    during a part upload (it ignores the failed upload when the stream is closed). Real files and
    pyarrow's own copy (``pyarrow.fs.PyFileSystem`` is its interface for filesystems written in
    Python); only the lost bytes are made up: losing them for real needs an S3 server that goes
    away (tests/integration/test_outage_s3.py)."""
    import io

    import fsspec
    import pyarrow
    import pyarrow.fs

    from aigc.contract import CHECKPOINT_NAME

    class Lossy(io.RawIOBase):
        def __init__(self, f):
            self.f, self.kept = f, 0

        def writable(self) -> bool:
            return True

        def write(self, data) -> int:
            keep = bytes(data)[: max(0, 100 - self.kept)]
            self.kept += len(keep)
            self.f.write(keep)
            return len(data)

        def close(self) -> None:
            self.f.close()
            super().close()

    class Handler(pyarrow.fs.FSSpecHandler):
        left = cuts

        def open_output_stream(self, path, metadata):
            if path.endswith(CHECKPOINT_NAME) and self.left:
                self.left -= 1
                return pyarrow.PythonFile(Lossy(self.fs.open(path, "wb")), mode="w")
            return super().open_output_stream(path, metadata)

    return pyarrow.fs.PyFileSystem(Handler(fsspec.filesystem("file")))


def test_a_checkpoint_upload_is_checked_in_storage_and_retried(tmp_path: Path, capsys) -> None:
    """upload_checkpoint (StepCheckpoint's checkpoint_upload_fn): a copy that left a short file is
    seen in storage and done again; one that stays short fails the job, naming the checkpoint and
    the storage path, after the retries (each printed), instead of letting Ray register it."""
    from ray.train import Checkpoint
    from ray.train.v2._internal.execution.storage import StorageContext

    from aigc.contract import CHECKPOINT_NAME
    from aigc.training.callbacks import CheckpointUploadError, upload_checkpoint

    local = _checkpoint_folder(tmp_path / "local", 20, {CHECKPOINT_NAME: 5000})
    checkpoint = Checkpoint.from_directory(str(local))

    def storage(name: str, cuts: int) -> StorageContext:
        return StorageContext(str(tmp_path / "runs"), name, storage_filesystem=_cut_uploads(cuts))

    stored = upload_checkpoint(checkpoint, local.name, storage=storage("once", 1), backoff_s=0.01)
    dest = tmp_path / "runs" / "once" / local.name
    assert stored.path == str(dest) and (dest / CHECKPOINT_NAME).stat().st_size == 5000
    out = capsys.readouterr().out
    assert f"checkpoint {local.name} not written complete to {dest}: " in out
    assert f"{CHECKPOINT_NAME} is 100 bytes, not 5000 bytes; retry 1 of 6" in out
    assert "retry 2" not in out

    with pytest.raises(CheckpointUploadError) as err:
        upload_checkpoint(checkpoint, local.name, storage=storage("always", 99), retries=2, backoff_s=0.01)
    dest = tmp_path / "runs" / "always" / local.name
    assert str(err.value).startswith(
        f"checkpoint {local.name} could not be written complete to the storage path {dest} in 3 tries "
        f"({CHECKPOINT_NAME} is 100 bytes, not 5000 bytes)"
    )
    assert capsys.readouterr().out.count("not written complete") == 2

    # A storage error (here: a file where the checkpoint folder goes) is retried too, then the cause.
    blocked = tmp_path / "runs" / "blocked"
    upload = storage("blocked", 0)
    (blocked / local.name).write_text("")
    with pytest.raises(CheckpointUploadError, match=r"in 2 tries \(the last try raised") as err:
        upload_checkpoint(checkpoint, local.name, storage=upload, retries=1, backoff_s=0.01)
    assert err.value.__cause__ is not None
    assert "retry 1 of 1" in capsys.readouterr().out


def test_train_and_register_names_the_version_or_the_retry(tmp_path: Path, monkeypatch) -> None:
    """`aigc train` is train, then register: the version lands in TrainResult.registered; a failed
    registration says the run FINISHED and how to retry, and leaves no --metrics-out record."""
    import json

    import aigc.registry.register as register
    import aigc.workflows.train as workflow
    from aigc.training import TrainError, TrainResult

    asked = []

    def fake_train(request, **_kwargs):
        asked.append(request)
        return TrainResult("t", "abc", "1", "sqlite:///x.db", "FINISHED", 20, "/runs/t/c.ckpt", "/runs/t")

    class Version:
        name, version = "aigc-vae", "3"

    monkeypatch.setattr(workflow, "train", fake_train)
    monkeypatch.setattr(register, "register_run", lambda *_a, **_k: Version())
    metrics = tmp_path / "m.json"
    out = workflow.train_and_register(None, name="t", metrics_out=metrics, messages=None)
    assert out.registered == "aigc-vae/3"
    assert asked[-1].metrics_out is None and json.loads(metrics.read_text())["run_id"] == "abc"
    assert workflow.train_and_register(None, register=False, messages=None).registered is None

    def broken(*_args, **_kwargs):
        raise RuntimeError("store down")

    monkeypatch.setattr(register, "register_run", broken)
    metrics.unlink()
    with pytest.raises(TrainError) as err:
        workflow.train_and_register(None, metrics_out=metrics, messages=None)
    assert str(err.value) == (
        "run t (abc) FINISHED, but registering it failed: store down. Retry with `aigc register abc`."
    )
    assert not metrics.exists()


def _checkpoint(epoch: int, done: int, state: dict | None) -> dict:
    ckpt = {
        "epoch": epoch,
        "loops": {"fit_loop": {"epoch_loop.batch_progress": {"current": {"processed": done}}}},
    }
    if state is not None:
        from aigc.training.callbacks import SEEN_KEY

        ckpt[SEEN_KEY] = state
    return ckpt


def test_a_resume_replans_the_rest_of_the_epoch_only_when_the_world_changed() -> None:
    """What a checkpoint's seen-samples entry makes of a resume: the same world skips batches (exact
    batches); another world, or an epoch already re-planned, re-plans from the samples seen."""
    import numpy as np
    import torch

    from aigc.training.callbacks import resume_plan

    seen = np.zeros(21, dtype=bool)
    seen[[0, 3, 20]] = True
    state = {"epoch": 2, "world": 2, "num_samples": 21, "replanned": False}
    state["bits"] = torch.from_numpy(np.packbits(seen))

    epoch, done, replan, callback = resume_plan(_checkpoint(2, 5, state), world=2)
    assert (epoch, done, replan) == (2, 5, None)  # same world: skip 5 batches
    assert callback.seen.nonzero().flatten().tolist() == [0, 3, 20]  # marks go on adding up
    epoch, done, replan, callback = resume_plan(_checkpoint(2, 5, state), world=3)
    assert replan.tolist() == seen.tolist() and callback.replanned
    again = resume_plan(_checkpoint(2, 9, {**state, "replanned": True}), world=2)
    assert again[2] is not None  # re-planned once: its batches are no longer the plain plan's
    # A checkpoint without the entry (older), or of an epoch the entry does not describe, skips.
    assert resume_plan(_checkpoint(2, 5, None), world=3)[2:] == (None, None)
    assert resume_plan(_checkpoint(3, 0, state), world=3)[2:] == (None, None)


def test_an_elastic_job_waits_less_for_a_worker_group_to_start(monkeypatch) -> None:
    """Ray counts a just-lost node as ready for a while; an elastic start that waits for it gives up
    after 30 s (not Ray's 60) and retries with the workers left. Fixed-size jobs keep Ray's default,
    an exported value wins over the elastic default, an explicit config value over both."""
    import os

    from aigc.training.launcher import START_TIMEOUT_ENV, _start_timeout

    def inside(*overrides: str) -> str | None:
        with _start_timeout(load_config(None, list(overrides)).scaling):
            return os.environ.get(START_TIMEOUT_ENV)

    monkeypatch.delenv(START_TIMEOUT_ENV, raising=False)
    assert inside("scaling.num_workers=2") is None
    assert inside("scaling.num_workers=1-2") == "30"
    assert inside("scaling.num_workers=2", "scaling.worker_start_timeout_s=300") == "300"
    assert START_TIMEOUT_ENV not in os.environ  # restored
    monkeypatch.setenv(START_TIMEOUT_ENV, "90")
    assert inside("scaling.num_workers=1-2") == "90"
    assert inside("scaling.num_workers=1-2", "scaling.worker_start_timeout_s=5") == "5"
    assert os.environ[START_TIMEOUT_ENV] == "90"


def test_the_best_checkpoint_is_the_best_evaluated_complete_one(tmp_path: Path) -> None:
    """``job.best_checkpoint``: by the figure's direction, among complete folders with a report; a
    tie goes to the later step; a report of a folder cut short does not count."""
    import json

    from aigc.contract import CHECKPOINT_NAME, EVAL_FILE, STEP_FILE
    from aigc.training.job import best_checkpoint, step_checkpoint

    run_dir = tmp_path / "run"
    assert best_checkpoint(str(run_dir), "eval/fd", "min") is None
    figures = {10: (30.0, 0.5), 20: (12.0, 0.9), 30: (12.0, 0.7), 40: (25.0, 0.95), 50: None}
    for step, values in figures.items():
        folder = _checkpoint_folder(run_dir, step)
        (folder / STEP_FILE).write_text(json.dumps({"global_step": step}))
        if values is not None:
            report = {"eval/fd": values[0], "eval/cond_accuracy": values[1]}
            (folder / EVAL_FILE).write_text(json.dumps(report))
    cut = _checkpoint_folder(run_dir, 60, {CHECKPOINT_NAME: 0})  # the best report, but no weights
    (cut / EVAL_FILE).write_text(json.dumps({"eval/fd": 1.0, "eval/cond_accuracy": 1.0}))

    best = best_checkpoint(str(run_dir), "eval/fd", "min")
    assert best["step"] == 30 and best["checkpoint"] == f"{run_dir}/checkpoint-step00000030/{CHECKPOINT_NAME}"
    assert best_checkpoint(str(run_dir), "eval/cond_accuracy", "max")["step"] == 40
    assert best_checkpoint(str(run_dir), "eval/clip_score", "max") is None  # never measured
    assert step_checkpoint(str(run_dir), 50) == f"{run_dir}/checkpoint-step00000050/{CHECKPOINT_NAME}"
    assert step_checkpoint(str(run_dir), 60) is None and step_checkpoint(str(run_dir), 70) is None


def test_checkpoint_staging_of_dead_workers_is_swept_and_a_live_ones_kept(tmp_path: Path) -> None:
    """A worker killed while reporting leaves its staged checkpoint in /tmp; the next report on the
    machine removes the folders whose process is gone, never a running process's."""
    import os
    import subprocess
    import sys

    from aigc.training.callbacks import STAGING_PREFIX, sweep_checkpoint_staging

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f"{STAGING_PREFIX}{dead_pid}-rank0-abcd"
    live = tmp_path / f"{STAGING_PREFIX}{os.getpid()}-rank0-efgh"
    other = tmp_path / "aigc-ckpt-notes"  # not a staging folder: no process id, no rank
    for folder in (stale, live, other):
        folder.mkdir()
        (folder / "checkpoint.ckpt").write_bytes(b"x" * 10)
    assert sweep_checkpoint_staging(str(tmp_path)) == [stale]
    assert not stale.exists() and live.exists() and other.exists()

"""``aigc train`` on a real local Ray cluster with a real MLflow sqlite store.

One embedded Ray instance serves the in-process tests (``ray_local``); the CLI tests run the real
console script in a subprocess. Configs are shrunk so each job takes seconds of compute.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from aigc.config import load_config
from tiny import SCRATCH_FAMILIES, TINY

ROOT = Path(__file__).resolve().parents[2]
AIGC = str(Path(sys.executable).parent / "aigc")

pytestmark = pytest.mark.slow


def tiny_overrides(family: str, tmp: Path, dataset: Path, steps: int = 20, workers: int = 2) -> list[str]:
    return [
        f"model.family={family}",
        *TINY[family],
        f"data.location={dataset}",
        "data.batch_size=32",
        "data.num_workers=0",
        f"trainer.max_steps={steps}",
        "trainer.warmup_steps=2",
        "trainer.log_every_steps=5",
        "trainer.val_every_steps=10",
        "trainer.limit_val_batches=2",
        "trainer.checkpoint_every_steps=10",
        "trainer.sample_every_steps=10",
        f"scaling.num_workers={workers}",
        f"scaling.storage_path={tmp / 'runs'}",
        f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}",
        "tracking.experiment=test",
        "tracking.system_metrics=false",
    ]


def test_embedded_ray_stays_on_loopback(ray_local):
    """init_ray keeps the embedded cluster on 127.0.0.1 although ray was imported before it ran."""
    import ray

    nodes = [n for n in ray.nodes() if n["Alive"]]
    assert [n["NodeManagerAddress"] for n in nodes] == ["127.0.0.1"]
    assert ray.util.get_node_ip_address() == "127.0.0.1"


@pytest.mark.timeout(180)
def test_embedded_ray_fixture_leaves_no_process_of_ray_behind(tmp_path):
    """``ray_local`` (``ray_cluster.embedded_ray``) stops what Ray started, even a process that
    outlives ``ray.shutdown()``, standing in for the idle ``ray::TrainController`` Ray leaves behind
    now and then: a task's grandchild (Ray kills a worker's children when it exits, not theirs). A
    process started beside Ray is kept."""
    import psutil

    code = f"""
import subprocess, sys, time, psutil, ray
sys.path.insert(0, {str(Path(__file__).parent)!r})
from ray_cluster import embedded_ray
beside = subprocess.Popen(["sleep", "120"])
def grandchild():
    shell = psutil.Process(subprocess.Popen(["sh", "-c", "sleep 120; exit 0"], start_new_session=True).pid)
    while not shell.children():
        time.sleep(0.05)
    return shell.children()[0].pid
with embedded_ray():
    print("ray's", ray.get(ray.remote(grandchild).remote(), timeout=60), flush=True)
print("beside", beside.pid, beside.poll(), flush=True)
beside.kill()
"""
    env = {**os.environ, "RAY_ADDRESS": ""}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=150, env=env, cwd=tmp_path
    )
    lines = [line.split(" ", 1) for line in out.stdout.splitlines()]
    words = {w[0]: w[1] for w in lines if len(w) == 2}
    assert "ray's" in words and words.get("beside", "").endswith(" None"), out.stdout + out.stderr[-3000:]
    pid = int(words["ray's"])
    try:
        stale = psutil.Process(pid)
        alive = stale.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        alive = False
    if alive:
        stale.kill()  # ours: the test started it through Ray
    assert not alive, f"Ray's process {pid} outlived the fixture"


@pytest.mark.timeout(180)
def test_ray_started_on_a_thread_stays_up_after_the_start(tmp_path):
    """`aigc train` starts Ray on a thread while it prepares the job (RayStart). Ray's GCS and raylet
    die with the *thread* that started them (PR_SET_PDEATHSIG): when that thread ended, the instance
    was gone seconds later. In a fresh process, as `aigc train` runs it: still serving tasks after
    the start, with a loopback address."""
    code = """
import time, ray
from aigc.cluster import RayStart
RayStart(None).wait()
time.sleep(3)
print("answer", ray.get(ray.remote(lambda: 7).remote(), timeout=60), ray.util.get_node_ip_address())
"""
    env = {**os.environ, "RAY_ADDRESS": ""}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=150, env=env, cwd=tmp_path
    )
    assert "answer 7 127.0.0.1" in out.stdout, out.stderr[-3000:]


def test_state_queries_in_the_embedded_ray_never_reach_another_cluster(ray_local):
    """Ray Train's PlacementGroupCleaner asks the state API, from inside the cluster, whether the run's
    controller lives. Left to itself the state client finds its cluster through
    /tmp/ray/ray_current_cluster, which `ray start` writes and nothing removes: a dead cluster's
    address made each query wait 40 s and each job end wait 12 s; a live one is another cluster.
    The embedded Ray's processes get an API address that refuses at once instead."""
    import ray

    @ray.remote(num_cpus=0)
    def query_state() -> str:
        from ray.util.state import get_actor

        try:
            get_actor("ff" * 16, timeout=10)
        except Exception as err:  # noqa: BLE001 - the message says which server was asked
            return f"{type(err).__name__}: {err}"
        return "answered"

    answer = ray.get(query_state.remote(), timeout=60)
    assert answer.startswith("ServerUnavailable") and "http://127.0.0.1:1/" in answer, answer


def losses(uri: str, run_id: str, key: str = "train/loss") -> dict[int, float]:
    return {m.step: m.value for m in MlflowClient(uri).get_metric_history(run_id, key)}


@pytest.mark.timeout(900)
@pytest.mark.parametrize("family", SCRATCH_FAMILIES)
def test_every_family_trains_on_two_workers(family, ray_local, digits_dataset, tmp_path, monkeypatch, capsys):
    from aigc.workflows.train import train_and_register

    keys_dir = tmp_path / "keys"
    keys_dir.mkdir()
    monkeypatch.setenv("AIGC_RECORD_KEYS_DIR", str(keys_dir))
    overrides = tiny_overrides(family, tmp_path, digits_dataset)
    metrics_out = tmp_path / "eval.json"
    evaluate = family == "diffusion"  # the end-of-run evaluation once; it trains the evaluator
    result = train_and_register(
        None, overrides, name=f"t-{family}", evaluate=evaluate, eval_samples=100, metrics_out=metrics_out
    )

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert result.global_step == 20
    # Params are the dotted config keys.
    assert run.data.params["trainer.max_steps"] == "20"
    assert run.data.params["model.family"] == family
    # Lineage tags (aigc.contract).
    tags = run.data.tags
    assert tags["aigc.family"] == family
    assert tags["aigc.ray.workers"] == "2"
    assert tags["aigc.data.name"] == "digits"
    assert len(tags["aigc.data.version"]) == 32
    # Metrics over steps, from rank 0 only (one value per step).
    hist = losses(uri, result.run_id)
    # Every log_every_steps optimiser steps (the GAN's two optimisers each count a step, so it
    # passes only the even multiples).
    expected = [5, 10, 15, 20] if family != "gan" else [10, 20]
    assert sorted(hist) == expected
    assert losses(uri, result.run_id, "val/loss"), "no val/loss logged"
    assert losses(uri, result.run_id, "perf/samples_per_s")
    # Start-up phases (benchmarks/cold_start.py reads them): the driver's own steps add up to its
    # preparation, and the job reached its worker, first batch and first step in that order.
    m = run.data.metrics
    steps = ["config", "manifest", "data_check", "data_version", "git", "mlflow_run", "tokenizer"]
    steps += ["job_file", "submit"]
    assert sum(m[f"startup/prepare.{s}_s"] for s in steps) == pytest.approx(m["startup/prepare_s"])
    assert 0 <= m["startup/ray_wait_s"] <= m["startup/ray_s"]
    assert m["startup/tracking_wait_s"] >= 0  # the child opening the run, waited for apart
    order = ["startup/fit_call_s", "startup/worker_s", "startup/first_batch_s", "startup/first_step_s"]
    assert [m[k] for k in order] == sorted(m[k] for k in order)
    # Dataset input and a sample image over steps.
    inputs = run.inputs.dataset_inputs
    assert inputs and inputs[0].dataset.digest == tags["aigc.data.version"]
    images = [a.path for a in client.list_artifacts(result.run_id, "images")]
    assert images, "no sample image logged"
    assert Path(result.sample_grid).is_file()
    # Checkpoints: step-based, kept under the storage path.
    ckpts = sorted(p.name for p in (tmp_path / "runs" / f"t-{family}").glob("checkpoint-step*"))
    assert ckpts[-1] == "checkpoint-step00000020"
    # Both ranks trained, on disjoint samples.
    seen = [
        {line.split()[1] for line in (keys_dir / f"keys-rank{r}.txt").read_text().splitlines()}
        for r in (0, 1)
    ]
    assert seen[0] and seen[1]
    assert not seen[0] & seen[1]
    # The final grid is made once, by rank 0 at the end of training, and logged as an artifact.
    assert result.sample_grid == f"{tmp_path / 'runs'}/t-{family}/samples-final.png"
    assert "samples-final.png" in [a.path for a in client.list_artifacts(result.run_id)]
    # aigc train (train_and_register) registered the final model: it loads as an MLflow pyfunc in a
    # fresh process where aigc is not importable (the package ships in the model), with no unpickling.
    assert result.registered == f"aigc-{family}/1"
    from aigc.registry.gate import promote

    assert promote(f"aigc-{family}", force=True, tracking_uri=uri).promoted  # eligible or not
    _load_pyfunc_without_aigc(uri, f"models:/aigc-{family}@production", size=8, channels=1)
    if evaluate:
        # The long step after training says what it is doing, on the cores the job was given.
        err = capsys.readouterr().err
        assert f"final evaluation of step 20 on {min(os.cpu_count() or 1, 2)} thread(s)" in err, err
        assert "evaluating: 100 samples" in err and "evaluated in" in err, err
        figures = json.loads(metrics_out.read_text())
        for key in ("eval/fd", "eval/clip_score", "eval/cond_accuracy"):
            assert key in figures
            assert run.data.metrics[key] == pytest.approx(figures[key])
        assert run.data.tags["aigc.eval.num_samples"] == "100"
        # The run's description (the UI's "Description") carries every eval/* figure.
        note = run.data.tags["mlflow.note.content"]
        for key in ("eval/fd", "eval/clip_score", "eval/cond_accuracy"):
            assert f"| {key} | {figures[key]:.4g} |" in note, note


_FRESH_PROCESS = """
import sys, json
# No aigc on the path: drop the editable install's src folder before anything imports it.
sys.path = [p for p in sys.path if p != {src!r}]
import importlib.util
assert importlib.util.find_spec("aigc") is None, "aigc is importable"
found = []
def hook(event, args):
    if event == "pickle.find_class":
        found.append(args)
sys.addaudithook(hook)
import mlflow.pyfunc, pandas as pd
mlflow.set_tracking_uri({uri!r})
model = mlflow.pyfunc.load_model({model_uri!r})
out = model.predict(pd.DataFrame({{"prompt": ["a handwritten digit one", "the digit 2"]}}),
                    params={{"num_samples": 2, "seed": 1}})
import aigc
print(json.dumps({{"images": list(out), "unpickled": [str(a) for a in found], "aigc": aigc.__file__}}))
"""


def _load_pyfunc_without_aigc(uri: str, model_uri: str, size: int, channels: int) -> None:
    import base64
    import io

    from PIL import Image

    src = str(ROOT / "src")
    code = _FRESH_PROCESS.format(src=src, uri=uri, model_uri=model_uri)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd="/")
    assert out.returncode == 0, out.stderr[-4000:]
    answer = json.loads(out.stdout.strip().splitlines()[-1])
    assert answer["unpickled"] == []  # no pickle.find_class during load and predict
    assert not answer["aigc"].startswith(src)  # the aigc shipped in the model's code/ folder
    assert len(answer["images"]) == 4
    for b64 in answer["images"]:
        with Image.open(io.BytesIO(base64.b64decode(b64))) as img:
            assert img.size == (size, size) and img.mode == ("L" if channels == 1 else "RGB")


@pytest.mark.timeout(900)
def test_worker_failure_resumes_from_checkpoint(ray_local, digits_dataset, tmp_path, monkeypatch):
    """Rank 1 dies at step 25 (3 s after the step-20 checkpoint); the group restarts and resumes."""
    from aigc.training import train

    steps = 40
    base = tiny_overrides("diffusion", tmp_path, digits_dataset, steps=steps) + [
        "scaling.max_failures=1",
        "trainer.lr_schedule=constant",
    ]
    reference = train(None, base, name="uninterrupted", evaluate=False)

    monkeypatch.setenv("AIGC_FAULT_EXIT_AT_STEP", "1:25")
    result = train(None, base, name="crashy", evaluate=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    assert client.get_run(result.run_id).info.status == "FINISHED"
    assert result.global_step == steps
    assert (tmp_path / "runs" / "crashy" / ".fault-injected").read_text() == "25"
    # One MLflow run for the job, not two.
    runs = client.search_runs(
        [client.get_run(result.run_id).info.experiment_id], "tags.`aigc.run.name` = 'crashy'"
    )
    assert len(runs) == 1
    # The restart resumed from the step-20 checkpoint, not from 0.
    resumed = losses(uri, result.run_id, "train/resumed_from_step")
    assert list(resumed.values()) == [20.0]
    # No spike after the resume: model, optimiser and EMA state came back; the losses after the
    # resume track the uninterrupted run's.
    crashed, ref = losses(uri, result.run_id), losses(uri, reference.run_id)
    assert set(crashed) == set(ref)
    after = [s for s in ref if s > 25]
    mean_c = sum(crashed[s] for s in after) / len(after)
    mean_r = sum(ref[s] for s in after) / len(after)
    assert abs(mean_c - mean_r) < 0.25 * mean_r, (crashed, ref)
    assert max(crashed[s] for s in after) < 1.5 * max(ref[s] for s in ref if s <= 20)


@pytest.mark.timeout(600)
def test_seeded_runs_are_deterministic(ray_local, digits_dataset, tmp_path):
    from aigc.training import train

    overrides = tiny_overrides("vae", tmp_path, digits_dataset, steps=15, workers=1)
    a = train(None, overrides, name="det-a", evaluate=False)
    b = train(None, overrides, name="det-b", evaluate=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    la, lb = losses(uri, a.run_id), losses(uri, b.run_id)
    assert la and la == lb
    assert a.registered is None  # aigc.training.train never registers


@pytest.mark.timeout(600)
def test_resume_continues_a_stopped_run_into_the_same_mlflow_run(
    ray_local, digits_dataset, tmp_path, monkeypatch
):
    from aigc.data.manifest import DatasetError
    from aigc.training import TrainError, train

    # A project root with no datasets/: the resumed job must stream the data its saved config names.
    monkeypatch.setenv("AIGC_PROJECT_ROOT", str(tmp_path))
    data = _copy_dataset(digits_dataset, tmp_path)

    overrides = tiny_overrides("autoregressive", tmp_path, data, steps=10, workers=1)
    first = train(None, overrides, name="cont", evaluate=False)
    with pytest.raises(TrainError, match="already exists"):
        train(None, overrides, name="cont", evaluate=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    resume_args = [f"scaling.storage_path={tmp_path / 'runs'}", "trainer.max_steps=20"]

    # A resume that fails after reopening the run (here: a val shard went bad, read for the sample
    # grid prompts; allowed past the start-up size check) ends the run FAILED with the error.
    shard = _val_shard(data)
    good = _truncate(shard)
    with pytest.raises(DatasetError, match=shard.name):
        train(
            None,
            resume_args,
            resume="cont",
            evaluate=False,
            messages=None,
            allow_modified_data=True,
        )
    run = client.get_run(first.run_id)
    assert run.info.status == "FAILED"
    assert shard.name in run.data.tags["aigc.error"]
    shard.write_bytes(good)

    # --resume finds the run under the configured storage path and keeps its saved config; it
    # reaches the store its job file names, not a dead server the environment now points at.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_free_port()}")
    second = train(None, resume_args, resume="cont", evaluate=False)
    assert second.run_id == first.run_id
    assert second.global_step == 20
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert "aigc.error" not in run.data.tags  # the failed attempt is history
    assert sorted(losses(uri, first.run_id)) == [5, 10, 15, 20]
    # The job file now records the resumed config: a later --resume continues from max_steps=20.
    job = json.loads((tmp_path / "runs" / "cont" / "aigc-job.json").read_text())
    assert job["run"]["trainer"]["max_steps"] == 20
    assert job["run_id"] == first.run_id and job["tracking_uri"] == uri


def _copy_dataset(dataset: Path, tmp: Path) -> Path:
    """A private copy of the session's digits shards, for tests that damage them."""
    import shutil

    return Path(shutil.copytree(dataset, tmp / "data" / dataset.name))


def _truncate(shard: Path) -> bytes:
    """Cut a tar inside its first member's data (tarfile reads a tar cut at a member boundary as a
    shorter, valid one); returns the original bytes."""
    good = shard.read_bytes()
    shard.write_bytes(good[:700])
    return good


def _val_shard(dataset: Path) -> Path:
    manifest = json.loads((dataset / "manifest.json").read_text())
    return dataset / manifest["splits"]["val"]["shards"][0]["name"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "split, index",
    [
        # Read for the sample-grid prompts, once the run is open.
        ("val", 0),
        # Read for the tokenizer while a child process opens the run (aigc.tracking.opener): the run
        # the child opened must still end FAILED, never RUNNING.
        ("train", 1),
    ],
)
def test_a_failure_once_the_run_is_being_opened_ends_it_failed(digits_dataset, tmp_path, split, index):
    """Once the MLflow run is being opened every failure ends it FAILED with aigc.error, before Ray
    trains: here a corrupt shard, read for the sample prompts or the tokenizer."""
    from aigc.training import train

    data = _copy_dataset(digits_dataset, tmp_path)
    manifest = json.loads((data / "manifest.json").read_text())
    shard = data / manifest["splits"][split]["shards"][index]["name"]
    _truncate(shard)
    with pytest.raises(Exception, match=shard.name):
        # allow_modified_data: the truncated shard must pass the start-up size check to be read.
        train(
            None,
            tiny_overrides("diffusion", tmp_path, data),
            name="doomed",
            evaluate=False,
            messages=None,
            allow_modified_data=True,
        )
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.run_name for r in runs] == ["doomed"]
    assert runs[0].info.status == "FAILED"
    assert shard.name in runs[0].data.tags["aigc.error"]
    assert runs[0].data.params  # the config was logged before the failure


@pytest.mark.timeout(120)
def test_an_unwritable_storage_path_is_refused_before_the_run_opens(digits_dataset, tmp_path):
    """The storage path is written once (a probe) before the MLflow run opens: a path the job cannot
    write fails naming it, with no run left behind (it used to fail after, leaving a FAILED run)."""
    from aigc.training import TrainError, train

    (tmp_path / "a-file").write_text("not a folder")
    overrides = [
        *tiny_overrides("diffusion", tmp_path, digits_dataset),
        f"scaling.storage_path={tmp_path / 'a-file' / 'runs'}",
    ]
    with pytest.raises(TrainError, match=r"cannot write to the storage path .*a-file/runs") as err:
        train(None, overrides, name="doomed", evaluate=False, messages=None)
    assert "no MLflow run was created" in str(err.value)
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.timeout(120)
def test_a_corrupt_val_shard_is_a_clear_cli_error_not_a_traceback(digits_dataset, tmp_path):
    """The command line says what failed (the shard's path) and exits 2, as for any other error."""
    data = _copy_dataset(digits_dataset, tmp_path)
    shard = _val_shard(data)
    _truncate(shard)
    args = ["train", str(ROOT / "models" / "diffusion.yaml"), "--allow-modified-data", "--no-eval"]
    for o in tiny_overrides("diffusion", tmp_path, data):
        args += ["--set", o]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = run_cli([*args, "--no-register"], env={"MLFLOW_TRACKING_URI": uri})
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr and "error:" in out.stderr and shard.name in out.stderr, out.stderr


def _train_shard(dataset: Path, i: int = 0) -> Path:
    manifest = json.loads((dataset / "manifest.json").read_text())
    return dataset / manifest["splits"]["train"]["shards"][i]["name"]


def _cut_to_a_third(shard: Path) -> int:
    """Truncate a shard to a third of its bytes; returns how many of its samples are
    no longer whole in the file (a sample is readable only if all its members end before the cut)."""
    import tarfile

    data = shard.read_bytes()
    cut = len(data) // 3
    ends: dict[str, int] = {}
    with tarfile.open(shard) as tar:
        for m in tar.getmembers():
            key = m.name.split(".", 1)[0]
            ends[key] = max(ends.get(key, 0), m.offset_data + m.size)
    shard.write_bytes(data[:cut])
    return sum(1 for end in ends.values() if end > cut)


class _Stopped(Exception):
    """Raised by a test where it stops a job."""


@pytest.mark.timeout(180)
def test_a_shard_changed_after_its_manifest_fails_the_job_before_ray_starts(
    digits_dataset, tmp_path, monkeypatch
):
    """A shard shortened after the manifest was written fails the job at the size check, naming it,
    before Ray starts and before any MLflow run exists; a change that keeps the size needs
    --verify-data (the re-hash) to be caught."""
    import aigc.training.launcher as launcher
    from aigc.data.manifest import read_manifest
    from aigc.training import TrainError, train

    def no_ray(*_args, **_kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(launcher, "RayStart", no_ray)
    data = _copy_dataset(digits_dataset, tmp_path)
    shard = _train_shard(data)
    good = shard.read_bytes()
    _cut_to_a_third(shard)
    with pytest.raises(TrainError) as err:
        train(
            None,
            tiny_overrides("diffusion", tmp_path, data),
            name="changed",
            evaluate=False,
            messages=None,
        )
    msg = str(err.value)
    assert f"{shard.name}: {len(good) // 3} bytes, the manifest lists {len(good)}" in msg
    assert "no MLflow run was created" in msg and "--allow-modified-data" in msg
    assert not (tmp_path / "mlflow.db").exists()
    assert not (tmp_path / "runs").exists()

    # Same size, different bytes: the size check passes it, `aigc train --verify-data` does not.
    shard.write_bytes(good)
    other = _train_shard(data, 1)
    raw = bytearray(other.read_bytes())
    raw[520] ^= 0xFF  # inside the first member's data
    other.write_bytes(bytes(raw))
    assert (
        launcher.check_data(str(data), read_manifest(data), verify=False, allow=False, resuming=False) == []
    )
    args = ["train", str(ROOT / "models" / "diffusion.yaml"), "--verify-data", "--no-eval", "--no-register"]
    for o in tiny_overrides("diffusion", tmp_path, data):
        args += ["--set", o]
    out = run_cli(args)
    assert out.returncode == 2, out.stderr
    assert f"{other.name}: sha256 or size differs from the manifest" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.timeout(300)
def test_a_truncated_shard_under_the_threshold_is_reported_on_a_run_the_mlflow_ui_can_show(
    ray_local, digits_dataset, tmp_path, monkeypatch, capsys
):
    """A damaged shard: a train shard cut to a third (66 of its 100 samples unreadable), under
    data.max_bad_fraction=0.1, 2 workers with a DataLoader worker process each, trained with
    --allow-modified-data. It FINISHES, and its metrics (per epoch, summed over ranks), tags, the
    terminal and the summary name what was skipped. The same run carries MLflow's own source, user
    and commit tags, a description and the experiment kind the UI's model-training view needs."""
    import getpass

    import aigc.training.launcher as launcher
    from aigc.cli.train import print_summary
    from aigc.tracking import command_line, git_sha
    from aigc.training import train

    data = _copy_dataset(digits_dataset, tmp_path)
    shard = _train_shard(data)
    lost = _cut_to_a_third(shard)
    assert lost == 66
    samples = json.loads((data / "manifest.json").read_text())["splits"]["train"]["num_samples"]
    said: list[str] = []
    overrides = tiny_overrides("diffusion", tmp_path, data) + [
        "data.max_bad_fraction=0.1",
        "data.num_workers=1",
    ]
    result = train(
        None,
        overrides,
        name="skips",
        evaluate=False,
        allow_modified_data=True,
        messages=said.append,
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    # One epoch end (the run stops at step 20 of its first 26-batch epoch): both ranks' counts.
    assert losses(uri, result.run_id, "data/bad_samples") == {20: lost}
    assert losses(uri, result.run_id, "data/bad_fraction") == pytest.approx({20: lost / samples})
    tags = run.data.tags
    assert tags["aigc.data.bad_shards"] == f"{shard.name} ({lost})"
    # The shard no longer matched the manifest: the data version is flagged, not trusted.
    assert tags["aigc.data.modified"] == "true"
    assert shard.name in tags["aigc.data.modified_shards"]
    # The terminal says it when training ends, and the summary lists it.
    assert any(f"skipped {lost} unreadable" in m and shard.name in m for m in said), said
    assert (result.bad_samples, result.bad_shards) == (lost, f"{shard.name} ({lost})")
    print_summary(result)
    summary = capsys.readouterr().out
    assert f"skipped {lost} unreadable train samples" in summary and shard.name in summary
    assert "differs from its manifest" in summary

    # MLflow's own tags: "Source", "Created by", the commit, the description; the experiment kind.
    assert tags["mlflow.source.name"] == command_line()
    assert tags["mlflow.source.type"] == "LOCAL"
    sha = git_sha(ROOT)
    if sha:
        assert tags["mlflow.source.git.commit"] == sha.removesuffix("-dirty")
    assert tags["mlflow.user"] == run.info.user_id == getpass.getuser()
    note = tags["mlflow.note.content"]
    assert "**diffusion**" in note and "20 of 20 steps" in note, note
    assert "Final sample grid: artifact `samples-final.png`" in note, note
    assert f"skipped {lost} unreadable" in note, note
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"

    # --resume keeps --allow-modified-data from the job record: the modified shard passes the check.
    job = json.loads((tmp_path / "runs" / "skips" / "aigc-job.json").read_text())
    assert job["allow_modified_data"] is True

    real_check = launcher.check_data

    def check_then_stop(*args, **kwargs):  # the real check, then stop before the run reopens
        raise _Stopped(real_check(*args, **kwargs))

    monkeypatch.setattr(launcher, "check_data", check_then_stop)
    with pytest.raises(_Stopped) as stopped:
        train(None, [f"scaling.storage_path={tmp_path / 'runs'}"], resume="skips", messages=None)
    assert [p.split(":")[0] for p in stopped.value.args[0]] == [shard.name]


def run_cli(args: list[str], env: dict[str, str] | None = None, timeout: float = 120):
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [AIGC, *args], capture_output=True, text=True, timeout=timeout, env=full_env, cwd=ROOT
    )


@pytest.mark.timeout(180)
def test_bad_config_fails_before_ray_starts(digits_dataset, tmp_path):
    overrides = tiny_overrides("diffusion", tmp_path, digits_dataset) + ["trainer.max_stepz=3"]
    args = ["train", str(ROOT / "models" / "diffusion.yaml")]
    for o in overrides:
        args += ["--set", o]
    t0 = time.monotonic()
    out = run_cli(args)
    assert out.returncode == 2, out.stderr
    assert "trainer.max_stepz" in out.stderr and "unknown key" in out.stderr
    assert "did you mean `trainer.max_steps`?" in out.stderr
    assert "Traceback" not in out.stderr
    assert time.monotonic() - t0 < 60  # never reached Ray
    assert not (tmp_path / "mlflow.db").exists()  # and never opened a run


@pytest.mark.timeout(180)
def test_unreachable_tracking_server_fails_fast(digits_dataset, tmp_path):
    import socket

    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["train", str(ROOT / "models" / "diffusion.yaml")]
    for o in tiny_overrides("diffusion", tmp_path, digits_dataset):
        if not o.startswith("tracking.uri"):
            args += ["--set", o]
    t0 = time.monotonic()
    out = run_cli(args, env={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"})
    elapsed = time.monotonic() - t0
    assert out.returncode == 2, out.stderr
    assert f"127.0.0.1:{port}" in out.stderr
    assert elapsed < 60
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.timeout(180)
def test_a_ray_address_where_nothing_listens_fails_fast_and_ends_the_run_failed(digits_dataset, tmp_path):
    """ray.init retries a dead GCS for minutes; `aigc train --ray-address` says so in seconds."""
    port = _free_port()
    args = ["train", str(ROOT / "models" / "diffusion.yaml"), "--ray-address", f"127.0.0.1:{port}"]
    for o in tiny_overrides("diffusion", tmp_path, digits_dataset):
        args += ["--set", o]
    t0 = time.monotonic()
    out = run_cli(args, env={"RAY_ADDRESS": ""})
    elapsed = time.monotonic() - t0
    assert out.returncode != 0, out.stdout[-2000:]
    assert f"cannot join the Ray cluster at 127.0.0.1:{port}: nothing answers there" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    assert elapsed < 60, elapsed
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert "nothing answers there" in runs[0].data.tags["aigc.error"]


def test_config_files_resolve_for_every_family():
    assert set(TINY) == set(SCRATCH_FAMILIES)  # a new family needs its tiny test config here
    for family in TINY:
        cfg = load_config(ROOT / "models" / f"{family}.yaml", TINY[family])
        assert cfg.model.family == family


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

"""S3-compatible storage end to end, on loopback: one moto server (``s3_server.py``) for the module.

- the digits shards are copied into the bucket and streamed from it by a 2-worker ``aigc train``,
  which writes its checkpoints there (``scaling.storage_path=s3://...``) and runs its final
  evaluation on the data in the bucket;
- a real ``mlflow server`` (``mlflow/start-server.sh``) keeps its artifacts in the bucket: sample
  grids and the registered model are objects there, and the model loads back from it;
- ``aigc reference`` and the registry's gate (re-evaluating two versions) read the data in the bucket;
- ``dvc push`` / ``dvc pull`` against an s3 remote on the same server;
- a wrong bucket or missing credentials fail in seconds with a message naming the URL.

Credentials and the endpoint reach every command through the environment only (``S3Server.env``),
as in ``docs/storage.md``; nothing is written into a config file or passed on a command line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dvc_repo import dvc, init_repo, repo_env
from s3_server import S3Server, free_port, stop_group, wait_until_answers

from aigc.data import read_manifest, verify_dataset, version
from tiny import TINY

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
BUCKET = "aigc"
DATA_URL = f"s3://{BUCKET}/datasets/digits"

pytestmark = pytest.mark.slow

# A tiny diffusion model (as in test_train.py): the point is the storage, not the model.
TINY_S3 = [
    "model.family=diffusion",
    *TINY["diffusion"],
    f"data.location={DATA_URL}",
    "data.batch_size=32",
    "data.num_workers=0",
    "trainer.max_steps=10",
    "trainer.warmup_steps=2",
    "trainer.log_every_steps=5",
    "trainer.val_every_steps=5",
    "trainer.limit_val_batches=1",
    "trainer.checkpoint_every_steps=5",
    "trainer.sample_every_steps=5",
    "scaling.num_workers=2",
    f"scaling.storage_path=s3://{BUCKET}/runs",
    "tracking.experiment=s3",
    "tracking.system_metrics=false",
]


class Stack:
    """The module's moto server, the dataset in its bucket, and an MLflow server storing its
    artifacts there (started in the background; :meth:`tracking_uri` waits until it answers)."""

    def __init__(self, s3: S3Server, base: Path):
        self.s3 = s3
        self.base = base
        self.mlflow_port = free_port()
        self._mlflow_log = open(base / "mlflow-server.log", "w")  # noqa: SIM115 - closed in stop()
        env = {**os.environ, **s3.env}
        env.pop("MLFLOW_TRACKING_URI", None)
        env.update(
            MLFLOW_BACKEND_STORE_URI=f"sqlite:///{base / 'mlflow.db'}",
            MLFLOW_ARTIFACTS_DESTINATION=f"s3://{BUCKET}/mlflow",
            MLFLOW_WORKERS="1",
            MLFLOW_BIN=str(BIN / "mlflow"),
        )
        self.mlflow = subprocess.Popen(
            ["bash", str(ROOT / "mlflow" / "start-server.sh"), "--port", str(self.mlflow_port)],
            env=env,
            stdout=self._mlflow_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def env(self) -> dict[str, str]:
        """The environment of an aigc command using this stack (credentials included)."""
        return {**os.environ, **self.s3.env, "OMP_NUM_THREADS": "1"}

    def tracking_uri(self, timeout: float = 120) -> str:
        uri = f"http://127.0.0.1:{self.mlflow_port}"
        wait_until_answers(f"{uri}/health", self.mlflow, self.base / "mlflow-server.log", timeout)
        return uri

    def stop(self) -> None:
        stop_group(self.mlflow, timeout=15)  # the server's process group: what this fixture started
        self._mlflow_log.close()
        self.s3.stop()
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()  # none may outlive the server in this process


@pytest.fixture(scope="module")
def stack(digits_dataset, tmp_path_factory):
    import s3fs

    base = tmp_path_factory.mktemp("s3")
    s3 = S3Server.start(base / "moto.log")
    try:
        s3.create_bucket(BUCKET)
        # Copy the shard folder into the bucket, as docs/storage.md shows (s3fs `put`).
        fs = s3fs.S3FileSystem(
            key=s3.env["AWS_ACCESS_KEY_ID"],
            secret=s3.env["AWS_SECRET_ACCESS_KEY"],
            endpoint_url=s3.endpoint,
            skip_instance_cache=True,
        )
        fs.put(f"{digits_dataset}/", DATA_URL.removeprefix("s3://") + "/", recursive=True)
        stack = Stack(s3, base)
    except BaseException:
        s3.stop()
        raise
    yield stack
    stack.stop()


def aigc(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "aigc"), *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT
    )


@pytest.mark.timeout(120)
def test_a_wrong_bucket_or_missing_credentials_fail_fast_naming_the_url(stack, tmp_path):
    """The data location is read first: a bad one stops `aigc train` before a run or Ray starts.
    (The storage path is local here: its own checks live in training/job.py.)"""
    args = ["train", str(ROOT / "models" / "diffusion.yaml")]
    local = [f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"scaling.storage_path={tmp_path / 'runs'}"]
    for o in [*TINY_S3, *local]:
        args += ["--set", o]
    wrong = "s3://no-such-bucket/datasets/digits"
    cases = {
        "wrong bucket": (
            [*args, "--set", f"data.location={wrong}"],
            stack.env,
            wrong,
            "bucket does not exist",
        ),
        "no credentials": (
            args,
            {
                **{
                    k: v
                    for k, v in stack.env.items()
                    if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
                },
                # nothing else to find credentials in, and no instance metadata service to wait for
                "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
                "AWS_CONFIG_FILE": str(tmp_path / "none"),
                "AWS_EC2_METADATA_DISABLED": "true",
            },
            DATA_URL,
            "AWS_ACCESS_KEY_ID",
        ),
    }
    for case, (argv, env, url, hint) in cases.items():
        t0 = time.monotonic()
        out = aigc(*argv, env=env, timeout=90)
        assert out.returncode == 2, (case, out.stderr[-3000:])
        assert f"{url}/manifest.json" in out.stderr and hint in out.stderr, (case, out.stderr)
        assert "Traceback" not in out.stderr, (case, out.stderr)
        assert time.monotonic() - t0 < 60, case
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()  # nothing opened
    # Good data, a storage path in a bucket that does not exist: refused before the run opens.
    out = aigc(
        *args,
        "--set",
        f"data.location={DATA_URL}",
        "--set",
        "scaling.storage_path=s3://no-such-bucket/runs",
        env=stack.env,
        timeout=90,
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert "cannot write to the storage path s3://no-such-bucket/runs" in out.stderr, out.stderr
    assert "AWS_ENDPOINT_URL" in out.stderr and not (tmp_path / "mlflow.db").exists()


@pytest.mark.timeout(180)
def test_dvc_push_and_pull_against_an_s3_remote(stack, digits_dataset, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    env = {**repo_env(tmp_path), **stack.s3.env}
    init_repo(repo, env)
    data = repo / "datasets" / "digits"
    shutil.copytree(digits_dataset, data)
    dvc(repo, env, "add", "datasets/digits")
    dvc(repo, env, "remote", "add", "-d", "s3remote", f"s3://{BUCKET}/dvc")
    dvc(repo, env, "remote", "modify", "s3remote", "endpointurl", stack.s3.endpoint)
    config = (repo / ".dvc" / "config").read_text()
    assert "testing" not in config and "secret" not in config  # credentials stay in the environment
    md5 = version(data)
    assert md5.endswith(".dir")

    assert "pushed" in dvc(repo, env, "push")
    keys = stack.s3.keys(BUCKET, "dvc/")
    assert any(k.endswith(".dir") for k in keys) and len(keys) >= 20, keys  # 19 shards, manifest, .dir

    shutil.rmtree(data)
    shutil.rmtree(repo / ".dvc" / "cache")
    dvc(repo, env, "pull")
    assert verify_dataset(data).ok
    assert version(data) == md5
    assert read_manifest(data)["digest"] == read_manifest(digits_dataset)["digest"]


@pytest.mark.timeout(600)
def test_train_evaluate_register_and_load_on_s3(stack, tmp_path, shared_evaluator_cache, monkeypatch):
    from mlflow.tracking import MlflowClient

    from aigc.registry.versions import load_version

    env = stack.env
    # The reference evaluator trains on the data in the bucket, cached locally by data version.
    out = aigc("reference", DATA_URL, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    record = dict(line.split(None, 1) for line in out.stdout.splitlines() if line.strip())
    assert record["data"] == DATA_URL, out.stdout
    digest = record["data_version"]
    assert (shared_evaluator_cache / digest / "weights.safetensors").is_file()

    uri = stack.tracking_uri()
    env = {**env, "MLFLOW_TRACKING_URI": uri}
    args = ["train", str(ROOT / "models" / "diffusion.yaml"), "--name", "s3-run", "--eval-samples", "20"]
    args += ["--metrics-out", str(tmp_path / "train.json")]
    for o in TINY_S3:
        args += ["--set", o]
    out = aigc(*args, env=env, timeout=480)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    assert "final evaluation skipped" not in out.stderr
    assert "evaluating: 20 samples" in out.stderr, out.stderr[-3000:]
    run_id = json.loads((tmp_path / "train.json").read_text())["run_id"]

    # Checkpoints, the job record and the final grid were written to the bucket.
    keys = stack.s3.keys(BUCKET, "runs/s3-run/")
    for key in ("aigc-job.json", "checkpoint-step00000010/checkpoint.ckpt", "samples-final.png"):
        assert f"runs/s3-run/{key}" in keys, keys
    assert f"checkpoint s3://{BUCKET}/runs/s3-run/checkpoint-step00000010/checkpoint.ckpt" in out.stdout

    # The final evaluation ran on the data in the bucket, and is recorded with its data version.
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    for key in ("eval/fd", "eval/clip_score", "eval/cond_accuracy"):
        assert key in run.data.metrics, sorted(run.data.metrics)
    assert run.data.tags["aigc.eval.data_version"] == run.data.tags["aigc.data.version"] == digest
    assert run.data.tags["aigc.eval.num_samples"] == "20"
    assert run.data.tags["aigc.storage"] == f"s3://{BUCKET}/runs/s3-run"
    assert DATA_URL in run.inputs.dataset_inputs[0].dataset.source

    # MLflow's artifacts are objects in the bucket: sample grids and the registered model.
    artifacts = stack.s3.keys(BUCKET, "mlflow/")
    assert any(k.endswith(f"{run_id}/artifacts/samples-final.png") for k in artifacts), artifacts
    assert any(f"{run_id}/artifacts/images/samples+step+" in k for k in artifacts), artifacts
    assert any(k.endswith("/artifacts/MLmodel") for k in artifacts), artifacts
    assert any(k.endswith("/export/weights.safetensors") for k in artifacts), artifacts
    assert "registered aigc-diffusion v1" in out.stdout, out.stdout[-2000:]

    # The gate on remote data. v1 becomes production; then production looks measured another way
    # (as a version evaluated with other settings would), so the gate re-evaluates both versions
    # on the run's dataset in the bucket, loading each model from the bucket through the server.
    from aigc.registry.gate import GateConfig, promote
    from aigc.registry.register import register_run

    for key, value in stack.s3.env.items():  # this process reads the data in the bucket now
        monkeypatch.setenv(key, value)
    assert promote("aigc-diffusion", tracking_uri=uri).promoted
    client.set_model_version_tag("aigc-diffusion", "1", "aigc.eval.num_samples", "500")
    assert register_run(run_id, uri).version == "2"
    said: list[str] = []
    decision = promote(
        "aigc-diffusion", gate=GateConfig(num_samples=20), tracking_uri=uri, progress=said.append
    )
    assert decision.reevaluated, decision.report()
    assert f"re-evaluating aigc-diffusion v2 on {DATA_URL} (20 samples, seed 0)" in said, said
    for v in ("1", "2"):
        tags = client.get_model_version("aigc-diffusion", v).tags
        assert tags["aigc.eval.source"] == "gate re-evaluation", tags
        assert tags["aigc.eval.num_samples"] == "20" and tags["aigc.eval.data_version"] == digest

    # The registered model loads back from the bucket (through the server) and draws images.
    module = load_version(client, client.get_model_version("aigc-diffusion", "2"))
    images = module.generate(["a handwritten digit three"], num_samples=2, seed=0)
    assert tuple(images.shape) == (2, 1, 8, 8) and str(images.dtype) == "torch.uint8"


@pytest.mark.timeout(600)
def test_only_the_best_checkpoints_and_the_newest_stay_in_the_bucket(stack, tmp_path):
    """Evaluation during training with ``trainer.keep_best_checkpoints=2`` on the S3 store: each
    evaluation's report is written beside its checkpoint in the bucket, and Ray deletes every other
    checkpoint from the bucket, leaving exactly the best 2 and the newest (the learning rate warms
    up to one far too high, so the newest is the worst: 3 folders)."""
    from mlflow.tracking import MlflowClient

    uri = stack.tracking_uri()
    env = {**stack.env, "MLFLOW_TRACKING_URI": uri}
    args = ["train", str(ROOT / "models" / "diffusion.yaml"), "--name", "s3-best", "--eval-samples", "32"]
    args += ["--no-register", "--metrics-out", str(tmp_path / "train.json")]
    settings = [
        *TINY_S3,
        "scaling.num_workers=1",  # the evaluation task runs on the embedded Ray's other CPU
        "trainer.max_steps=20",
        "trainer.lr=0.05",
        "trainer.warmup_steps=20",
        "trainer.eval_every_steps=5",
        "trainer.keep_best_checkpoints=2",
    ]
    for o in settings:
        args += ["--set", o]
    out = aigc(*args, env=env, timeout=540)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    run_id = json.loads((tmp_path / "train.json").read_text())["run_id"]

    fd = sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, "eval/fd"))
    assert [s for s, _ in fd] == [5, 10, 15, 20], fd
    best = sorted(fd, key=lambda item: item[1])
    assert best[0][0] != 20, fd  # the samples got worse: the newest is not the best
    keys = stack.s3.keys(BUCKET, "runs/s3-best/")
    folders = sorted({k.split("/")[2] for k in keys if k.split("/")[2].startswith("checkpoint-step")})
    expected = sorted({best[0][0], best[1][0], 20})
    assert len(expected) == 3 and folders == [f"checkpoint-step{s:08d}" for s in expected], (folders, fd)
    for folder in folders:
        for name in ("checkpoint.ckpt", "aigc-step.json", "aigc-eval.json"):
            assert f"runs/s3-best/{folder}/{name}" in keys, keys
    assert (
        f"checkpoint s3://{BUCKET}/runs/s3-best/checkpoint-step{best[0][0]:08d}/checkpoint.ckpt" in out.stdout
    )

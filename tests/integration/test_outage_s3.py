"""S3 goes away while a checkpoint is being written: what Ray Train 2.60 and aigc do, and what a
resume starts from.

Two hosts on a bridge (:mod:`netns`): an S3-compatible server (moto) on host 0, and ``aigc train``
(with its embedded Ray) on host 1, checkpointing to ``s3://<bucket>/runs`` at host 0's address; the
MLflow store is a local sqlite file. Host 1's uplink is slowed (``tc`` token bucket) so that one
checkpoint (2.3 MB) takes seconds to upload; as soon as the first object of the step-20 checkpoint
is in the bucket, S3 goes away for up to :data:`DOWN_S` seconds, two ways:

- ``link-down``: host 0's link is down (moto keeps its objects in memory, so the server stays up):
  packets vanish, TCP waits. Measured before aigc guarded against it: the job rode it out and ended
  FINISHED ~17 s after the link was back, but pyarrow's S3 stream *ignored* the failed upload of
  ``checkpoint.ckpt`` ("Error ignored when destroying file of type ObjectOutputStream ...
  UploadPart ... Timeout was reached", in the worker log), Ray logged "Checkpoint successfully
  created" and registered step 20 in its snapshot: a checkpoint with no files, which a resume would
  be handed.
- ``no-route``: host 1 has no route to host 0: every request fails at once. Measured: Ray's
  controller fails writing ``checkpoint_manager_snapshot.json`` ("Training failed due to controller
  error"), the job fails within seconds and the run ends FAILED; if that write was the first, no
  snapshot exists, and before aigc guarded against it ``aigc train --resume`` trained from step 0
  although step 10 was complete.

What Ray Train 2.60 does (``ray/train/v2/_internal/execution/context.py``, ``storage.py``,
``checkpoint/checkpoint_manager.py``): ``ray.train.report`` uploads a checkpoint synchronously in
the worker (``pyarrow.fs.copy_files``), then queues the report; the controller registers it and
rewrites the snapshot, the list a restarted or resumed job restores from (a failure there is a
controller error, not retried). Required here: every checkpoint in the snapshot is complete in the
bucket, and a resume starts from the last complete checkpoint (step 10), never the cut one.

What aigc does about the two gaps (``docs/stack-pitfalls.md``): its upload
(``aigc.training.callbacks.upload_checkpoint``, Ray's ``checkpoint_upload_fn``) checks every file's
size in the bucket after Ray's copy and retries with doubling waits (63 s in all) before it fails
the job, so Ray never registers a cut checkpoint and a 30 s outage is ridden out; and a resumed
launch that Ray hands no checkpoint starts from the run folder's newest complete
``checkpoint-step*`` folder (``aigc.training.job.complete_checkpoints``).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from netns import hosts, unavailable
from ray_cluster import BIN
from s3_server import CREDENTIALS, wait_until_answers
from test_train import losses, tiny_overrides

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
if reason := unavailable():
    pytest.skip(reason, allow_module_level=True)

PORT = 5000  # host 0's own network: nothing else listens there
DOWN_S = 30.0
STEPS, EVERY = 20, 10  # the cut checkpoint (step 20) is the last one
RATE = "4mbit"  # host 1's uplink: a checkpoint of the tiny VAE (2.3 MB) takes ~5 s to upload
FILES = ("aigc-step.json", "checkpoint.ckpt")  # what aigc puts in every checkpoint folder

#: How S3 goes away, as (cut off, restore) commands for ``Hosts.run`` (see the module docstring).
OUTAGES = {
    "link-down": lambda net: (
        (0, ["ip", "link", "set", "eth0", "down"]),
        (0, ["ip", "link", "set", "eth0", "up"]),
    ),
    "no-route": lambda net: (
        (1, ["ip", "route", "add", "unreachable", f"{net.addresses[0]}/32"]),
        (1, ["ip", "route", "del", "unreachable", f"{net.addresses[0]}/32"]),
    ),
}


class Bucket:
    """boto3 on the bucket, with short timeouts and no retries: a poll, not a wait."""

    def __init__(self, endpoint: str, name: str):
        import boto3
        from botocore.config import Config

        self.name = name
        self.client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
            config=Config(connect_timeout=2, read_timeout=5, retries={"max_attempts": 1}),
        )
        self.client.create_bucket(Bucket=name)

    def keys(self, prefix: str) -> dict[str, int]:
        """Key -> size of every object under ``prefix``; {} when the server does not answer."""
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.name, Prefix=prefix)
            return {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", [])}
        except Exception:  # noqa: BLE001 - unreachable: nothing seen
            return {}

    def snapshot(self) -> list[str] | None:
        """The checkpoint folders Ray's snapshot lists, None when there is no snapshot."""
        try:
            body = self.client.get_object(
                Bucket=self.name, Key="runs/outage/checkpoint_manager_snapshot.json"
            )
        except self.client.exceptions.NoSuchKey:
            return None
        return [r["checkpoint_dir_name"] for r in json.loads(body["Body"].read())["checkpoint_results"]]

    def complete(self, folder: str) -> bool:
        """Whether every file of the checkpoint ``folder`` is in the bucket."""
        present = self.keys(f"runs/outage/{folder}/")
        return all(f"runs/outage/{folder}/{name}" in present for name in FILES)


def ckpt(step: int) -> str:
    return f"checkpoint-step{step:08d}"


@pytest.fixture(scope="module")
def s3_host(tmp_path_factory):
    """Host 0 runs moto, host 1 is where `aigc train` runs; one pair of hosts for the module (a
    host's name is made from this process's id: a second pair could meet the first one's veth, which
    the kernel keeps a while after a link went down under open connections)."""
    tmp = tmp_path_factory.mktemp("outage-s3")
    with hosts(2) as net:
        print("hosts", net.names)
        log = tmp / "moto.log"
        moto = net.popen(
            0,
            [str(BIN / "moto_server"), "-H", net.addresses[0], "-p", str(PORT)],
            env={k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
        )
        endpoint = f"http://{net.addresses[0]}:{PORT}"
        wait_until_answers(f"{endpoint}/moto-api/", moto, log, 60)
        try:
            yield net, endpoint
        finally:
            for proc in list(net.procs):
                net.stop(proc)
            for host in range(2):  # no half-open connection left to keep a namespace alive
                net.run(host, ["ss", "-K", "-t"], capture_output=True)


@pytest.mark.timeout(420)
@pytest.mark.parametrize("outage", sorted(OUTAGES))
def test_an_s3_outage_during_a_checkpoint_never_leaves_a_cut_checkpoint_to_resume(
    outage, s3_host, tmp_path, digits_dataset
):
    from mlflow.tracking import MlflowClient

    net, endpoint = s3_host
    bucket = Bucket(endpoint, f"aigc-{outage}")
    env = {
        **os.environ,
        **CREDENTIALS,
        "AWS_ENDPOINT_URL": endpoint,
        "OMP_NUM_THREADS": "1",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    for key in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        env.pop(key, None)
    storage = f"s3://{bucket.name}/runs"
    shape = ["tc", "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate", RATE, "burst", "16kb"]
    shaped = net.run(1, [*shape, "latency", "5s"], capture_output=True, text=True)
    assert shaped.returncode == 0, shaped.stderr
    try:
        overrides = tiny_overrides("vae", tmp_path, digits_dataset, steps=STEPS, workers=1) + [
            f"trainer.checkpoint_every_steps={EVERY}",
            "trainer.val_every_steps=1000",
            "trainer.sample_every_steps=1000",
            f"scaling.storage_path={storage}",
        ]
        sets = [a for o in overrides for a in ("--set", o)]
        train_log = tmp_path / "train.log"
        with train_log.open("w") as out:
            train = net.popen(
                1,
                [str(BIN / "aigc"), "train", "models/vae.yaml", "--name", "outage", "--no-eval",
                 "--no-register", *sets],
                env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip

        # Step 10's checkpoint in the bucket, then the first object of step 20's: S3 goes away now.
        deadline = time.monotonic() + 240
        while not (seen := bucket.keys(f"runs/outage/{ckpt(2 * EVERY)}/")):
            assert train.poll() is None, train_log.read_text()[-4000:]
            assert time.monotonic() < deadline, train_log.read_text()[-4000:]
            time.sleep(0.05)
        cut_off, restore = OUTAGES[outage](net)
        assert net.run(*cut_off).returncode == 0
        cut = time.monotonic()
        try:
            while time.monotonic() - cut < DOWN_S and train.poll() is None:
                time.sleep(0.2)
        finally:
            assert net.run(*restore).returncode == 0
        back = time.monotonic() - cut
        rc = train.wait(timeout=180)
        figures = (
            f"{outage}: step-20 objects when cut {sorted(seen)}; S3 back after {back:.1f} s; job "
            f"exited rc={rc} {time.monotonic() - cut:.1f} s after the cut"
        )
        print(figures)
    finally:
        net.run(1, ["tc", "qdisc", "del", "dev", "eth0", "root"])
    text = train_log.read_text()
    assert f"runs/outage/{ckpt(2 * EVERY)}/checkpoint.ckpt" not in seen, f"not cut half-way: {figures}"
    assert bucket.complete(ckpt(EVERY)), figures
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow = MlflowClient(uri)
    (run,) = mlflow.search_runs([mlflow.get_experiment_by_name("test").experiment_id])
    listed = bucket.snapshot()
    incomplete = [folder for folder in listed or [] if not bucket.complete(folder)]
    print(f"snapshot lists {listed}; incomplete of those: {incomplete}")
    # upload_checkpoint checked every file in the bucket before Ray could register the checkpoint.
    assert not incomplete, f"Ray registered {incomplete} without its files: {figures}"
    if rc == 0:  # the upload went through the outage: every checkpoint complete, nothing lost
        assert run.info.status == "FINISHED", text[-3000:]
        assert all(bucket.complete(ckpt(s)) for s in range(EVERY, STEPS + 1, EVERY)), figures
        assert sorted(losses(uri, run.info.run_id)) == list(range(5, STEPS + 1, 5))
        return

    # Failed clearly: the run FAILED with the storage error; step 20 half-written, not in the snapshot.
    assert run.info.status == "FAILED", text[-3000:]
    error = run.data.tags.get("aigc.error", "")
    print("error:", error[-400:])
    assert bucket.name in error or "S3" in error or "AWS" in error, error[-2000:]
    assert not bucket.complete(ckpt(2 * EVERY)) and ckpt(2 * EVERY) not in (listed or [])

    t0 = time.monotonic()
    resumed = net.run(
        1,
        [str(BIN / "aigc"), "train", "--resume", "outage", "--no-eval", "--no-register",
         "--set", f"scaling.storage_path={storage}"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    print(f"resume: rc={resumed.returncode} in {time.monotonic() - t0:.1f} s")
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-4000:]
    run = mlflow.get_run(run.info.run_id)
    assert run.info.status == "FINISHED"
    assert sorted(losses(uri, run.info.run_id)) == list(range(5, STEPS + 1, 5))
    assert all(bucket.complete(ckpt(s)) for s in range(EVERY, STEPS + 1, EVERY))
    # The resumed job started from step 10, the last complete checkpoint, never the cut one.
    resumed_from = list(losses(uri, run.info.run_id, "train/resumed_from_step").values())
    # With no snapshot (listed is None) Ray hands the worker no checkpoint: step 10 then comes from
    # the worker's fallback to the run folder's newest complete checkpoint folder.
    assert resumed_from == [float(EVERY)], (listed, resumed_from)

"""aigc on a Ray cluster it did not start: `ray job submit` and `aigc serve --ray-address`.

One two-node cluster for the module, started the way a team starts one (`ray start --head` with the
dashboard, then `ray start --address` on a second node), on 127.0.0.1 with Ray's token
authentication on. The job is submitted with the project as its working dir and
``platform/runtime-env.yaml``'s settings pointed at this test's store and storage: the documented
command, end to end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from ray_cluster import BIN, alive_nodes, free_port, ray_cluster
from test_train import tiny_overrides

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    """A head (dashboard on) and a second node on 127.0.0.1, one CPU each; stopped by process group."""
    tmp = tmp_path_factory.mktemp("cluster")
    with ray_cluster(tmp, nodes=2, dashboard=True) as c:
        yield {"address": c.address, "dashboard": c.dashboard, "env": c.env, "tmp": tmp}


def submit(cluster: dict, runtime_env: dict, entrypoint: list[str], timeout: float = 400):
    """`ray job submit --runtime-env FILE --working-dir <project> -- ENTRYPOINT` (waits for the end)."""
    path = cluster["tmp"] / f"runtime-env-{time.monotonic_ns()}.yaml"
    path.write_text(yaml.safe_dump(runtime_env))
    cmd = [
        str(BIN / "ray"),
        "job",
        "submit",
        "--address",
        cluster["dashboard"],
        "--runtime-env",
        str(path),
        "--working-dir",
        str(ROOT),
        "--",
        *entrypoint,
    ]
    return subprocess.run(cmd, env=cluster["env"], capture_output=True, text=True, timeout=timeout)


def documented_runtime_env(**env_vars: str) -> dict:
    """platform/runtime-env.yaml with its site-specific values replaced by this test's."""
    runtime_env = yaml.safe_load((ROOT / "platform" / "runtime-env.yaml").read_text())
    assert {"MLFLOW_TRACKING_URI", "AIGC_STORAGE_PATH"} <= set(runtime_env["env_vars"])
    runtime_env["env_vars"].update(env_vars)
    return runtime_env


@pytest.fixture(scope="module")
def submitted_job(cluster, digits_dataset):
    """A 2-worker job submitted as the README documents it; its store, storage and output."""
    tmp = cluster["tmp"]
    keys_dir = tmp / "keys"
    keys_dir.mkdir()
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    runtime_env = documented_runtime_env(
        MLFLOW_TRACKING_URI=uri,
        AIGC_STORAGE_PATH=str(tmp / "runs"),
        AIGC_RECORD_KEYS_DIR=str(keys_dir),  # each rank writes its node id and keys here
    )
    overrides = [
        o
        for o in tiny_overrides("vae", tmp, digits_dataset, steps=10)
        if not o.startswith(("scaling.storage_path=", "tracking.uri="))  # from the runtime env
    ]
    entrypoint = ["aigc", "train", "models/vae.yaml", "--workers", "2", "--name", "submitted", "--no-eval"]
    for o in overrides:
        entrypoint += ["--set", o]
    out = submit(cluster, runtime_env, entrypoint)
    return {"out": out, "uri": uri, "keys": keys_dir, "runs": tmp / "runs"}


def test_ray_job_submit_trains_on_both_nodes_into_the_store_and_storage_it_was_given(submitted_job):
    from mlflow.tracking import MlflowClient

    out = submitted_job["out"]
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-3000:]
    assert "succeeded" in out.stdout and "FINISHED" in out.stdout
    keys = submitted_job["keys"]
    assert sorted(p.name for p in keys.iterdir()) == [
        "attempts.txt",
        "keys-rank0.txt",
        "keys-rank1.txt",
        "node-rank0.txt",
        "node-rank1.txt",
    ], out.stdout[-4000:]
    assert len({(keys / f"node-rank{r}.txt").read_text() for r in (0, 1)}) == 2, (
        "both workers ran on one node"
    )
    assert (keys / "attempts.txt").read_text().split() == ["0", "2"], "one attempt, from step 0, on 2 workers"
    # The runtime env's store and storage, not the working-dir package Ray deletes.
    job = json.loads((submitted_job["runs"] / "submitted" / "aigc-job.json").read_text())
    assert job["tracking_uri"] == submitted_job["uri"]
    assert list((submitted_job["runs"] / "submitted").glob("checkpoint_*"))
    run = MlflowClient(submitted_job["uri"]).get_run(job["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["aigc.ray.workers"] == "2"
    assert "_ray_pkg_" not in run.info.artifact_uri


def test_a_job_without_a_durable_store_or_storage_is_refused_with_the_way_out(cluster, digits_dataset):
    overrides = [
        o for o in tiny_overrides("vae", cluster["tmp"], digits_dataset) if not o.startswith("tracking.uri=")
    ]
    entrypoint = ["aigc", "train", "models/vae.yaml", "--no-eval"]
    for o in overrides:
        entrypoint += ["--set", o]
    out = submit(cluster, {"excludes": [".venv/", ".git/"]}, entrypoint, timeout=200)
    assert out.returncode != 0
    text = out.stdout + out.stderr
    assert "inside the Ray working-dir package _ray_pkg_" in text, text[-3000:]
    assert "platform/runtime-env.yaml" in text and "MLFLOW_TRACKING_URI" in text


@pytest.mark.timeout(300)
def test_aigc_serve_deploys_onto_the_running_cluster_and_leaves_it_running(cluster, submitted_job):
    """The job registered its model; `aigc serve --ray-address` deploys it onto the same cluster."""
    assert submitted_job["out"].returncode == 0, "the submitted job failed (see the test above)"
    port = free_port()
    log = cluster["tmp"] / "serve.log"
    cmd = [
        str(BIN / "aigc"),
        "serve",
        "aigc-vae@candidate",
        "--ray-address",
        cluster["address"],
        "--tracking-uri",
        submitted_job["uri"],
        "--port",
        str(port),
        "--cpus-per-replica",
        "0.25",
    ]
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd, env=cluster["env"], stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 180
        while "serving    http://" not in log.read_text():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        body = json.dumps({"prompt": "a handwritten digit 3", "num_samples": 2, "seed": 1}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/generate", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as r:
            answer = json.loads(r.read())
        assert len(answer["images"]) == 2 and answer["version"] == "1"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
        assert "stopped" in log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    # A joined cluster is not ours to stop: both nodes still up.
    assert alive_nodes(cluster["address"], cluster["env"]) == 2

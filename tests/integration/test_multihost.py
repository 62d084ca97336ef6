"""Training across two hosts joined by a real network: Ray nodes in two network namespaces.

Each Ray node runs on its own host (a network namespace, :mod:`netns`) with its own address on a
bridge; nothing between them goes over loopback. This machine's name resolves to 127.0.0.1 in
``/etc/hosts`` (Debian's default is 127.0.1.1; many bare-metal hosts do the same), which is the case
where Gloo, left to itself, advertises 127.0.0.1 to the other rank and the process group never forms
("Gloo connectFullMesh failed ... Connection refused, remote=[127.0.0.1]"). aigc binds each worker's
Gloo and NCCL to the interface of its Ray node address (``aigc.cluster.worker_runtime_env``): the
job below sets no ``GLOO_SOCKET_IFNAME`` and trains with one worker per host.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from netns import hosts, unavailable
from ray_cluster import BIN, alive_nodes
from test_train import tiny_overrides

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
if reason := unavailable():
    pytest.skip(reason, allow_module_level=True)


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory: pytest.TempPathFactory):
    """A Ray head on host 0 and a second node on host 1, one CPU each, token authentication on."""
    tmp = tmp_path_factory.mktemp("multihost")
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    for key in (
        "RAY_ADDRESS",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER",
        "GLOO_SOCKET_IFNAME",
        "NCCL_SOCKET_IFNAME",
    ):
        env.pop(key, None)  # real addresses, and nothing set by hand: aigc must bind Gloo itself
    dirs = [tempfile.mkdtemp(prefix="aigc-ray-", dir="/tmp") for _ in range(2)]  # short: Ray's sockets
    with hosts(2) as net:
        address = f"{net.addresses[0]}:6379"
        common = ["--num-cpus=1", "--block", "--disable-usage-stats"]
        logs = [(tmp / f"node{i}.log").open("w") for i in range(2)]
        try:
            net.popen(
                0,
                [str(BIN / "ray"), "start", "--head", "--port=6379", f"--node-ip-address={net.addresses[0]}",
                 "--include-dashboard=false", f"--temp-dir={dirs[0]}", *common],
                env=env, stdout=logs[0], stderr=subprocess.STDOUT,
            )  # fmt: skip
            deadline = time.monotonic() + 120
            while alive_nodes(address, env, prefix=tuple(net.command(0, []))) < 1:
                assert time.monotonic() < deadline, (tmp / "node0.log").read_text()[-3000:]
                time.sleep(1)
            net.popen(
                1,
                [str(BIN / "ray"), "start", f"--address={address}", f"--node-ip-address={net.addresses[1]}",
                 f"--temp-dir={dirs[1]}", *common],
                env=env, stdout=logs[1], stderr=subprocess.STDOUT,
            )  # fmt: skip
            while alive_nodes(address, env, prefix=tuple(net.command(0, []))) < 2:
                assert time.monotonic() < deadline, (tmp / "node1.log").read_text()[-3000:]
                time.sleep(1)
            yield {"net": net, "address": address, "env": env, "tmp": tmp}
        finally:
            for proc in list(net.procs):
                net.stop(proc)
            for log in logs:
                log.close()
            for d in dirs:
                shutil.rmtree(d, ignore_errors=True)


def test_two_host_training_binds_gloo_to_the_node_interface(two_hosts, digits_dataset):
    """Two workers, one CPU each on two one-CPU hosts: one rank per host, the process group over the
    bridge. With the binding taken out of launcher.py this test fails in Gloo's connectFullMesh."""
    net, tmp = two_hosts["net"], two_hosts["tmp"]
    sets = [a for o in tiny_overrides("vae", tmp, digits_dataset, steps=10) for a in ("--set", o)]
    out = net.run(
        0,
        [str(BIN / "aigc"), "train", "models/vae.yaml", "--ray-address", two_hosts["address"], "--no-eval",
         "--no-register", *sets],
        env=two_hosts["env"], cwd=ROOT, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert "FINISHED, 10 steps" in out.stdout, out.stdout[-2000:]
    assert "connectFullMesh" not in out.stdout + out.stderr
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    (run,) = client.search_runs(client.get_experiment_by_name("test").experiment_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["scaling.num_workers"] == "2"  # two ranks on two one-CPU hosts

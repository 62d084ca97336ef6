"""A Ray cluster started by a test the way a team starts one (`ray start`), on 127.0.0.1, and the
embedded Ray that `aigc train` starts (``embedded_ray``).

Used by test_cluster.py (a head with the dashboard and a second node, for `ray job submit`) and by
test_pipeline.py (one warm head that every `aigc train` of `dvc repro` joins). Every process is
started in its own session and stopped by its process group id, never by name.

docs/stack-pitfalls.md: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps every Ray process on 127.0.0.1 on
Linux; `ray start` turns token authentication on, so every client (ray job submit, aigc) must send
the token (RAY_AUTH_MODE=token, and RAY_AUTH_TOKEN, which the fixture makes).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alive_nodes(address: str, env: dict[str, str], prefix: tuple[str, ...] = ()) -> int:
    """Alive nodes of the cluster at ``address``, asked by a client run as ``prefix + python``
    (e.g. ``ip netns exec HOST`` for a cluster on network namespaces); 0 when it does not answer."""
    code = (
        f"import ray; ray.init(address={address!r}, logging_level='ERROR'); "
        "print(sum(1 for n in ray.nodes() if n['Alive']))"
    )
    cmd = [*prefix, sys.executable, "-c", code]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    return int(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 and out.stdout.strip() else 0


@dataclass
class Cluster:
    address: str  # the GCS, for --ray-address / RAY_ADDRESS
    env: dict[str, str]  # the environment of every client: loopback, token auth, this venv first on PATH
    dashboard: str | None = None  # http://127.0.0.1:PORT when started with the dashboard
    procs: list[subprocess.Popen] = field(default_factory=list)


@contextlib.contextmanager
def ray_cluster(
    tmp: Path, *, nodes: int = 1, cpus_per_node: int = 1, dashboard: bool = False, within_s: float = 120
) -> Iterator[Cluster]:
    """A head (plus ``nodes - 1`` more nodes) on 127.0.0.1; yields once all are alive."""
    port = free_port()
    env = {
        **os.environ,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_AUTH_MODE": "token",
        # The cluster's own token: `ray start --head` does not create one (only ray.init() does, in
        # ~/.ray/auth_token), so on a fresh machine it would fail unless an earlier test made it.
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # a job's `aigc`
    }
    for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):  # the second: see test_multihost's fixture
        env.pop(key, None)
    cluster = Cluster(address=f"127.0.0.1:{port}", env=env)
    common = [
        f"--num-cpus={cpus_per_node}",
        "--node-ip-address=127.0.0.1",
        "--block",
        "--disable-usage-stats",
    ]
    head = [str(BIN / "ray"), "start", "--head", f"--port={port}", f"--ray-client-server-port={free_port()}"]
    if dashboard:
        dash = free_port()
        head += ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}"]
        cluster.dashboard = f"http://127.0.0.1:{dash}"
    else:
        head += ["--include-dashboard=false"]
    # With RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 `ray start --address` refuses to join; this wrapper
    # lifts only the refusal.
    join = [sys.executable, str(Path(__file__).with_name("ray_loopback_node.py")), "start"]
    node_dirs: list[str] = []
    logs = []
    try:
        for i in range(nodes):
            log = (tmp / f"ray-node{i}.log").open("w")  # noqa: SIM115 - closed below
            logs.append(log)
            if i == 0:
                cmd = [*head, *common]
            else:
                # Each node its own temp dir, as separate machines have: two raylets sharing one
                # session folder share runtime_resources/, and the second one deleted a job's
                # working-dir package while the job's driver on the head still ran in it ("[Errno 2]
                # No such file or directory" from os.getcwd()). Short: Ray's sockets live there.
                node_dirs.append(tempfile.mkdtemp(prefix="aigc-ray-", dir="/tmp"))
                cmd = [*join, f"--address={cluster.address}", f"--temp-dir={node_dirs[-1]}", *common]
            cluster.procs.append(
                subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            )
            deadline = time.monotonic() + within_s
            while alive_nodes(cluster.address, env) < i + 1:
                assert time.monotonic() < deadline, (tmp / f"ray-node{i}.log").read_text()[-3000:]
                time.sleep(1)
        yield cluster
    finally:
        for p in cluster.procs:  # stop what was started here, by process group id
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=30)
        for log in logs:
            log.close()
        for d in node_dirs:
            shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def embedded_ray() -> Iterator[None]:
    """An embedded Ray started by aigc's ``init_ray`` in this process, as `aigc train` starts one.

    On exit, ``ray.shutdown()``; then every process ``init_ray`` started (GCS, raylet, dashboard, ...)
    and every descendant of those (Ray's workers and actors, and what they started) that is still
    alive 10 s later is killed by pid. Ray leaves an idle ``ray::TrainController`` behind now and then
    (one was alive 13 minutes after its test module ended), and on a 2-core machine it takes CPU from
    every test after it. A server another fixture started meanwhile is not under these processes and
    is never touched; psutil checks each process's start time, so a reused pid is safe."""
    import psutil
    import ray

    from aigc.cluster import init_ray

    me = psutil.Process()
    before = {p.pid for p in me.children()}
    init_ray(None)
    roots = [p for p in me.children() if p.pid not in before]
    try:
        yield
    finally:
        started = []
        for root in roots:
            with contextlib.suppress(psutil.NoSuchProcess):  # it ended already
                started += [root, *root.children(recursive=True)]
        ray.shutdown()
        _, alive = psutil.wait_procs(started, timeout=10)
        for proc in alive:
            with contextlib.suppress(psutil.NoSuchProcess):  # it ended meanwhile
                proc.kill()
        psutil.wait_procs(alive, timeout=10)

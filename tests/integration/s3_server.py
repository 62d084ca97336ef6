"""An S3-compatible server on 127.0.0.1 for the tests: moto's server mode in a subprocess.

    with S3Server.start(tmp_path / "moto.log") as s3:
        s3.create_bucket("aigc")
        env = {**os.environ, **s3.env}  # AWS_* variables pointing every client at it

The server runs in its own process group on a free port and is stopped by that group's id: only
what this helper started. Its credentials are moto's dummies ("testing"), passed to clients only
through the environment, the way real credentials reach aigc, Ray, MLflow and DVC.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent

#: Dummy credentials moto accepts; real ones come from the environment the same way.
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_answers(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    """Poll ``url`` until it answers; an ``AssertionError`` with the server's log when ``proc``
    exits or ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            assert proc.poll() is None, f"{url}: the server exited:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"{url}: no answer in {timeout} s:\n{log.read_text()[-3000:]}"
            time.sleep(0.3)


def stop_group(proc: subprocess.Popen, timeout: float = 10) -> None:
    """SIGTERM the process group a test started ``proc`` in (``start_new_session=True``), SIGKILL it
    after ``timeout`` seconds: what the test started, nothing else."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=timeout)


@dataclass
class S3Server:
    """A running ``moto_server`` (see the module docstring)."""

    port: int
    proc: subprocess.Popen
    log: Path
    _log_file: object = field(repr=False, default=None)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """What a client needs: the credentials and the endpoint (botocore, s3fs, pyarrow, DVC and
        MLflow's artifact client all read ``AWS_ENDPOINT_URL``; MLflow also its own variable)."""
        return {
            **CREDENTIALS,
            "AWS_ENDPOINT_URL": self.endpoint,
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint,
        }

    @classmethod
    def start(cls, log: Path, timeout: float = 60) -> S3Server:
        port = free_port()
        log_file = open(log, "w")  # noqa: SIM115 - closed in stop()
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        proc = subprocess.Popen(
            [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        server = cls(port, proc, log, log_file)
        try:
            wait_until_answers(f"{server.endpoint}/moto-api/", proc, log, timeout)
        except AssertionError:
            server.stop()
            raise
        return server

    def client(self):
        """A boto3 S3 client on this server."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
        )

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every object key under ``prefix`` in ``bucket``."""
        paginator = self.client().get_paginator("list_objects_v2")
        return [
            obj["Key"]
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix)
            for obj in page.get("Contents", [])
        ]

    def stop(self) -> None:
        """Stop the server's process group (what :meth:`start` started, nothing else)."""
        stop_group(self.proc)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> S3Server:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

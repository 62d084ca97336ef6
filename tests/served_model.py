"""A registered tiny diffusion model and a real ``aigc serve`` for it on 127.0.0.1, shared by the
tests that talk HTTP to a server (tests/integration/test_serving.py, tests/e2e/test_playground.py).

Importable from every test (pytest puts ``tests/`` on ``sys.path`` for ``tests/conftest.py``). The
model trains a few dozen steps in the test's process (the one Trainer builder; no Ray), is
registered in a sqlite MLflow registry, and ``aigc serve`` runs in a session of its own, stopped by
its process group id.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

from PIL import Image

from tiny import TINY, save_run_checkpoint

ROOT = Path(__file__).resolve().parents[1]
AIGC = str(Path(sys.executable).parent / "aigc")
NAME = "aigc-diffusion"

TINY_RUN = [
    *TINY["diffusion"],
    "data.num_workers=0",
    "data.batch_size=32",
    "trainer.warmup_steps=2",
    "trainer.lr=3e-3",
]


def trained_version(uri: str, tmp: Path, dataset: Path, name: str, steps: int, seed: int) -> str:
    """A FINISHED run the way aigc train leaves it, registered: returns the new version number."""
    import pytorch_lightning as pl
    import torch

    from aigc.config import load_config
    from aigc.data.captions_io import read_captions
    from aigc.data.loader import ShardDataModule
    from aigc.models import build_module
    from aigc.models.text import Tokenizer
    from aigc.registry.register import register_run
    from aigc.tracking import end_job_run, start_job_run
    from aigc.training.trainer import build_trainer

    cfg = load_config(ROOT / "models" / "diffusion.yaml", [*TINY_RUN, f"trainer.max_steps={steps}"])
    pl.seed_everything(seed, verbose=False)
    module = build_module(cfg, Tokenizer.build(read_captions(dataset, "train")), 8, 1)
    trainer = build_trainer(module, limit_val_batches=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 torch threads on a busy 2-core machine run several times slower
    try:
        trainer.fit(module, datamodule=ShardDataModule(cfg.data, location=dataset, seed=seed))
    finally:
        torch.set_num_threads(threads)
    run_dir = tmp / "runs" / name
    save_run_checkpoint(trainer, run_dir, steps)
    tags = {"aigc.family": "diffusion", "aigc.storage": str(run_dir), "aigc.run.name": name}
    run_id = start_job_run(uri, "serving-test", name, tags=tags)
    end_job_run(uri, run_id)
    return register_run(run_id, uri).version


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body, timeout: float = 60, raw: bytes | None = None) -> tuple[int, dict]:
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(f"{url}/generate", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        text = err.read()
        try:
            return err.code, json.loads(text)
        except ValueError:
            return err.code, {"text": text.decode(errors="replace")}


def get(url: str, path: str) -> dict:
    with urllib.request.urlopen(f"{url}{path}", timeout=10) as r:
        return json.loads(r.read())


def decode(images: list[str]) -> list[Image.Image]:
    out = []
    for b64 in images:
        with Image.open(io.BytesIO(base64.b64decode(b64))) as img:
            img.load()
            out.append(img)
    return out


def stop(proc: subprocess.Popen) -> int:
    """SIGTERM to the server's process group; SIGKILL to it if still running after 30 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        return proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        return -9


@contextlib.contextmanager
def serving(ref: str, uri: str, tmp: Path, args: list[str] = ()) -> Iterator[SimpleNamespace]:
    """``aigc serve REF --tracking-uri URI`` on a free port of 127.0.0.1 with the extra ``args``,
    in its own session (cwd and ``serve.log`` in ``tmp``), once it serves; stopped by process group
    on exit unless a test stopped it. Yields ``url``, ``proc`` and ``log`` (the log's path)."""
    port = free_port()
    log_path = tmp / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # always the embedded Ray
    cmd = [AIGC, "serve", ref, "--tracking-uri", uri, "--port", str(port), *args]
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 150
        while "stop with Ctrl-C" not in log_path.read_text():  # printed once it serves
            assert proc.poll() is None, log_path.read_text()[-4000:]
            assert time.monotonic() < deadline, log_path.read_text()[-4000:]
            time.sleep(0.5)
        yield SimpleNamespace(url=url, proc=proc, log=log_path)
    finally:
        if proc.poll() is None:
            stop(proc)

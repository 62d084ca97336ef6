"""Unpack the device bundle and run the project's normal commands on a GPU machine; figures to JSON.

Runs with the device's own Python (the one that holds CUDA torch and Lightning) and its standard
library only, until the bundle is unpacked:

1. checks every part of ``build/device-bundle`` against ``manifest.json`` (size, sha256), checks the
   bundle was built for this Python (SOABI), and unpacks it into ``--dest`` (skipped when the same
   bundle is already there: ignored folders stay on a warm device between calls);
2. puts the bundle and ``src/`` on ``PYTHONPATH`` and an ``aigc`` launcher (what pip would write for
   the console script) on ``PATH``. The bundle holds no distribution the device has, so nothing in
   it shadows the device's CUDA torch; the run checks that ``torch`` comes from outside the bundle;
3. ``aigc data build`` of the emoji at 64 px (or ``--data``), then for each family with a
   ``models/<family>-rgb64.yaml`` whose data is images: ``aigc train CONFIG --workers 1
   --gpus-per-worker 1`` in bf16-mixed through Ray Train into a local MLflow sqlite store, which
   registers it as ``@candidate``;
4. ``aigc serve <model>@candidate`` and one ``POST /generate``: HTTP 200 and a PNG of the model's size;
5. ``benchmarks/throughput.py --device cuda --sizes 64``: samples/s, FLOPs and model FLOPs
   utilisation per family;
6. writes ``device-figures.json`` into ``--out`` (``$OUT`` on the device machine).

``--cpu`` is the same flow with no GPU, tiny and short: one family, a few steps, 16 px, 32-bit; the
test suite runs it against a simulated device Python. Exit status 0 only when every step passed.

    python3 platform/device/run_device.py --out "$OUT"          # on the device (README.md)
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import sysconfig
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = "manifest.json"
STAMP = ".bundle-sha256"  # in --dest: which archive it holds
SERVE_READY_S = 300.0


class DeviceError(RuntimeError):
    """A step failed; the message says which part, path or command."""


class _Parts:
    """The parts, read in order as one stream, each checked against its sha256 as it ends."""

    def __init__(self, folder: Path, parts: list[dict]) -> None:
        self.folder, self.parts, self.index = folder, parts, -1
        self.fh = None
        self.hash = hashlib.sha256()
        self.whole = hashlib.sha256()
        self.count = 0

    def _next(self) -> bool:
        if self.fh is not None:
            self.fh.close()
            part = self.parts[self.index]
            if self.count != part["bytes"] or self.hash.hexdigest() != part["sha256"]:
                raise DeviceError(
                    f"{self.folder / part['file']}: {self.count} bytes, sha256 {self.hash.hexdigest()}; "
                    f"the manifest says {part['bytes']} bytes, sha256 {part['sha256']}"
                )
        self.index += 1
        if self.index >= len(self.parts):
            self.fh = None
            return False
        path = self.folder / self.parts[self.index]["file"]
        if not path.is_file():
            raise DeviceError(f"{path}: part {self.index + 1} of {len(self.parts)} is missing (carry it)")
        self.fh, self.hash, self.count = path.open("rb"), hashlib.sha256(), 0
        return True

    def read(self, n: int = -1) -> bytes:
        if self.index == -1 and not self._next():
            return b""
        while self.fh is not None:
            chunk = self.fh.read(n if n > 0 else 1 << 20)
            if chunk:
                self.hash.update(chunk)
                self.whole.update(chunk)
                self.count += len(chunk)
                return chunk
            if not self._next():
                break
        return b""


def unpack(bundle: Path, dest: Path) -> dict:
    """Check the parts and unpack them into ``dest``; returns the manifest."""
    try:
        manifest = json.loads((bundle / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DeviceError(f"{bundle / MANIFEST}: {err} (build it with make device-bundle)") from err
    soabi = sysconfig.get_config_var("SOABI")
    if manifest["soabi"] != soabi:
        raise DeviceError(
            f"{bundle}: built for {manifest['soabi']} (Python {manifest['python']}), but {sys.executable} "
            f"is {soabi}: rebuild with this Python's probe.py output as --target"
        )
    stamp = dest / STAMP
    if stamp.is_file() and stamp.read_text().strip() == manifest["archive_sha256"]:
        return manifest
    dest.mkdir(parents=True, exist_ok=True)
    stream = _Parts(bundle, manifest["parts"])
    with tarfile.open(fileobj=stream, mode="r|xz") as tar:
        tar.extractall(dest, filter="data")
    while stream.read():  # the rest after tar's end blocks: the last part's checksum is checked at its end
        pass
    if stream.whole.hexdigest() != manifest["archive_sha256"]:
        raise DeviceError(f"{bundle}: the parts together are not the archive the manifest names")
    stamp.write_text(manifest["archive_sha256"] + "\n")
    return manifest


def environment(dest: Path, work: Path, cpu: bool) -> dict[str, str]:
    """The environment of every command: the bundle and src/ importable, ``aigc`` on PATH, Ray and
    MLflow local, and no usage reports (the machine reaches nothing)."""
    bin_dir = work / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    launcher = bin_dir / "aigc"
    launcher.write_text(f"#!{sys.executable}\nimport sys\nfrom aigc.cli import main\nsys.exit(main())\n")
    launcher.chmod(0o755)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(dest), str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    env["PATH"] = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), env.get("PATH", "")])
    env["RAY_ADDRESS"] = ""  # the embedded Ray of aigc train/serve, never a leftover cluster
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    env["AIGC_EVALUATOR_CACHE"] = str(work / "evaluators")
    env["PYTHONUNBUFFERED"] = "1"
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def run(cmd: list[str], env: dict[str, str], log: Path, timeout: float) -> tuple[str, float]:
    """Run one command with its output in ``log``; its output and wall seconds, or DeviceError."""
    t0 = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.run(
            cmd, env=env, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout, check=False
        )
    seconds = time.perf_counter() - t0
    text = log.read_text(errors="replace")
    if proc.returncode != 0:
        raise DeviceError(f"{' '.join(cmd[:3])} ... exited {proc.returncode} (log {log}):\n{text[-3000:]}")
    return text, seconds


def check_python(env: dict[str, str], dest: Path, cpu: bool) -> dict:
    """Where torch and the bundled packages come from, as the commands will find them: located (not
    imported, which takes seconds) and versioned from their metadata; on a GPU run torch is imported
    to ask for CUDA."""
    code = """
import importlib.metadata as md, importlib.util as iu, json, sys
out = {}
for mod, dist in [("torch", "torch"), ("pytorch_lightning", "pytorch-lightning"), ("ray", "ray"),
                  ("mlflow", "mlflow"), ("aigc", None)]:
    spec = iu.find_spec(mod)
    out[mod + "_file"] = spec.origin if spec else None
    out[mod] = md.version(dist) if spec and dist else None
if sys.argv[1] == "gpu":
    import torch
    out.update(cuda=torch.version.cuda, cuda_available=torch.cuda.is_available(),
               gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
print(json.dumps(out))
"""
    out = subprocess.run(
        [sys.executable, "-c", code, "cpu" if cpu else "gpu"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise DeviceError(f"looking up the stack failed:\n{out.stderr[-3000:]}")
    info = json.loads(out.stdout.strip().splitlines()[-1])
    missing = [k[: -len("_file")] for k, v in info.items() if k.endswith("_file") and v is None]
    if missing:
        raise DeviceError(f"{sys.executable} with {dest} finds no {', '.join(missing)}")
    if Path(info["torch_file"]).resolve().is_relative_to(dest.resolve()):
        raise DeviceError(f"torch comes from the bundle ({info['torch_file']}), not the device's own")
    if not Path(info["ray_file"]).resolve().is_relative_to(dest.resolve()):
        raise DeviceError(f"ray comes from {info['ray_file']}, not the bundle {dest}")
    if not cpu and not info["cuda_available"]:
        raise DeviceError(f"torch {info['torch']} sees no CUDA device (use --cpu for a run without one)")
    return info


def rgb64_configs() -> tuple[list[Path], list[dict]]:
    """The 64 px RGB configs that train on images (``<family>-rgb64.yaml`` and the autoencoder's
    ``autoencoder-kl64.yaml``), and the ones left out with the reason."""
    configs, skipped = [], []
    paths = sorted({*(ROOT / "models").glob("*-rgb64.yaml"), *(ROOT / "models").glob("autoencoder-*64.yaml")})
    for path in paths:
        text = path.read_text()
        if re.search(r"^\s*source:\s*latents\b", text, re.M):
            skipped.append(
                {"config": path.name, "reason": "trains on latents (aigc data encode first): not run"}
            )
        else:
            configs.append(path)
    return configs, skipped


def family_of(path: Path) -> str:
    match = re.search(r"^\s*family:\s*([\w-]+)", path.read_text(), re.M)
    if not match:
        raise DeviceError(f"{path}: no model.family")
    return match.group(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png_size(data: bytes) -> tuple[int, int]:
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        raise DeviceError("/generate answered an image that is not a PNG")
    return struct.unpack(">II", data[16:24])


def serve_once(ref: str, env: dict[str, str], log: Path, image_size: int) -> dict:
    """``aigc serve REF`` in its own process group, one POST /generate, then stop it (by its group)."""
    port = free_port()
    cmd = ["aigc", "serve", ref, "--port", str(port), "--poll-interval", "0", "--cpus-per-replica", "1"]
    t0 = time.perf_counter()
    fh = log.open("w")
    proc = subprocess.Popen(
        cmd, env=env, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
    )
    base = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                raise DeviceError(
                    f"aigc serve exited {proc.returncode} (log {log}):\n{log.read_text()[-3000:]}"
                )
            try:
                with urllib.request.urlopen(base + "/healthz", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.perf_counter() - t0 > SERVE_READY_S:
                raise DeviceError(
                    f"aigc serve {ref}: no /healthz answer in {SERVE_READY_S:.0f} s (log {log})"
                )
            time.sleep(1.0)
        ready = time.perf_counter() - t0
        body = json.dumps({"prompt": "red apple", "num_samples": 1, "seed": 0}).encode()
        req = urllib.request.Request(
            base + "/generate", data=body, headers={"Content-Type": "application/json"}, method="POST"
        )
        t1 = time.perf_counter()
        with urllib.request.urlopen(req, timeout=120) as r:
            status, answer = r.status, json.loads(r.read())
        latency = time.perf_counter() - t1
        if status != 200 or not answer.get("images"):
            raise DeviceError(f"/generate answered {status} with {str(answer)[:300]}")
        width, height = png_size(base64.b64decode(answer["images"][0]))
        if (width, height) != (image_size, image_size):
            raise DeviceError(f"/generate gave a {width}x{height} image, expected {image_size}x{image_size}")
        return {
            "ref": ref,
            "status": status,
            "version": answer.get("version"),
            "image": f"{width}x{height}",
            "ready_s": round(ready, 1),
            "first_request_s": round(latency, 3),
            # aigc serve places its replicas on CPUs (app.py asks Ray for num_cpus only and the
            # registry loads exports to the CPU): the model is trained on the GPU, served on the CPU.
            "device": "cpu",
        }
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        fh.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, default=ROOT / "build" / "device-bundle")
    p.add_argument("--dest", type=Path, default=ROOT / "build" / "device-site", help="where it is unpacked")
    p.add_argument(
        "--work", type=Path, default=ROOT / "build" / "device-work", help="data, runs, MLflow store"
    )
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ROOT / "build" / "device-out")))
    p.add_argument("--cpu", action="store_true", help="no GPU: one family, a few steps, 16 px, 32-bit")
    p.add_argument(
        "--families", nargs="+", default=None, help="default: every rgb64 image family (--cpu: vae)"
    )
    p.add_argument("--steps", type=int, default=None, help="training steps per family (default 300; --cpu 4)")
    p.add_argument("--data", type=Path, default=None, help="a built emoji dataset (default: aigc data build)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], help="KEY=VALUE for every aigc train"
    )
    p.add_argument(
        "--bench-steps", type=int, default=None, help="throughput.py --steps (default 30; --cpu 1)"
    )
    p.add_argument("--skip-bench", action="store_true", help="leave out benchmarks/throughput.py")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    a.work.mkdir(parents=True, exist_ok=True)
    figures: dict = {"mode": "cpu" if a.cpu else "gpu", "python": sys.version.split()[0], "steps": {}}
    result_path = a.out / "device-figures.json"
    logs = a.work / "logs"
    logs.mkdir(exist_ok=True)
    size = 16 if a.cpu else 64
    precision = "32" if a.cpu else "bf16-mixed"
    steps = a.steps or (4 if a.cpu else 300)
    ok = False
    try:
        t0 = time.perf_counter()
        manifest = unpack(a.bundle, a.dest)
        figures["steps"]["unpack_s"] = round(time.perf_counter() - t0, 1)
        figures["bundle"] = {
            "archive_bytes": manifest["archive_bytes"],
            "parts": len(manifest["parts"]),
            "distributions": len(manifest["distributions"]),
        }
        env = environment(a.dest, a.work, a.cpu)
        t0 = time.perf_counter()
        figures["stack"] = check_python(env, a.dest, a.cpu)
        figures["steps"]["import_check_s"] = round(time.perf_counter() - t0, 1)

        data = a.data
        if data is None:
            data = a.work / f"emoji{size}"
            if not (data / "manifest.json").is_file():
                cmd = ["aigc", "data", "build", f"emoji{size}", "--source", "openmoji", "--out", str(data)]
                cmd += ["--set", f"data.image_size={size}", "--set", "data.channels=3", "--overwrite"]
                _, s = run(cmd, env, logs / "data-build.log", 900)
                figures["steps"]["data_build_s"] = round(s, 1)
        configs, skipped = rgb64_configs()
        wanted = a.families or (["vae"] if a.cpu else None)
        if wanted:
            unknown = set(wanted) - {family_of(c) for c in configs}
            if unknown:
                raise DeviceError(f"--families {sorted(unknown)}: no image-data models/*-rgb64.yaml for them")
            configs = [c for c in configs if family_of(c) in wanted]
        figures["skipped"] = skipped
        trained = []
        for config in configs:
            family = family_of(config)
            cmd = ["aigc", "train", str(config.relative_to(ROOT)), "--workers", "1", "--no-eval"]
            if not a.cpu:
                cmd += ["--gpus-per-worker", "1"]
            sets = [
                f"trainer.precision='{precision}'",  # quoted: a bare 32 would parse as a number
                f"trainer.max_steps={steps}",
                f"trainer.warmup_steps={max(1, steps // 10)}",
                f"trainer.val_every_steps={max(1, steps // 2)}",
                "trainer.limit_val_batches=1",
                f"trainer.sample_every_steps={steps}",
                f"trainer.checkpoint_every_steps={steps}",
                f"trainer.log_every_steps={max(1, steps // 4)}",
                f"data.location={data}",
                f"data.image_size={size}",
                f"scaling.storage_path={a.work / 'runs'}",
                f"tracking.uri=sqlite:///{a.work / 'mlflow.db'}",
                "tracking.experiment=device",
                *(
                    ["data.batch_size=8", "data.num_workers=0", "tracking.system_metrics=false"]
                    if a.cpu
                    else []
                ),
                *a.overrides,
            ]
            for s in sets:
                cmd += ["--set", s]
            metrics = a.work / f"metrics-{family}.json"
            cmd += ["--metrics-out", str(metrics)]
            text, seconds = run(cmd, env, logs / f"train-{family}.log", 1800)
            reg = re.search(r"registered (\S+) v(\d+) as candidate", text)
            if not reg:
                raise DeviceError(
                    f"aigc train {config.name}: no registration line (log {logs / f'train-{family}.log'})"
                )
            m = json.loads(metrics.read_text())
            trained.append(
                {
                    "family": family,
                    "config": config.name,
                    "run_id": m["run_id"],
                    "step": m["step"],
                    "wall_s": round(seconds, 1),
                    "registered": f"{reg.group(1)}/{reg.group(2)}",
                    "precision": precision,
                    "image_size": size,
                }
            )
        figures["train"] = trained
        if not trained:
            raise DeviceError("no family was trained")
        # A generator answers /generate; the autoencoder is the latent stage, not one.
        generators = [t for t in trained if t["family"] != "autoencoder"]
        if not generators:
            raise DeviceError("no generator was trained: nothing to serve")
        ref = generators[0]["registered"].split("/")[0] + "@candidate"
        t0 = time.perf_counter()
        figures["serve"] = serve_once(ref, env, logs / "serve.log", size)
        figures["steps"]["serve_s"] = round(time.perf_counter() - t0, 1)  # start, one request, stop

        if not a.skip_bench:
            families = sorted({t["family"] for t in trained})
            cmd = [sys.executable, "benchmarks/throughput.py", "--device", "cpu" if a.cpu else "cuda"]
            cmd += ["--sizes", "64", "--families", *families]
            cmd += ["--steps", str(a.bench_steps or (1 if a.cpu else 30))]
            if a.cpu:
                cmd += ["--warmup", "1", "--batch-size", "2", *sum((["--set", s] for s in a.overrides), [])]
            text, seconds = run(cmd, env, logs / "throughput.log", 1800)
            figures["steps"]["throughput_s"] = round(seconds, 1)
            figures["throughput"] = json.loads(text.strip().splitlines()[-1])
        ok = True
    except (DeviceError, subprocess.TimeoutExpired) as err:
        figures["error"] = str(err)
        print(f"run_device: {err}", file=sys.stderr)
    finally:
        result_path.write_text(json.dumps(figures, indent=1) + "\n")
        # The commands' logs, one file (a device call returns at most 8 files from $OUT).
        with tarfile.open(a.out / "device-logs.tar.gz", "w:gz") as tar:
            tar.add(logs, arcname="logs")
        print(json.dumps({k: v for k, v in figures.items() if k != "stack"}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

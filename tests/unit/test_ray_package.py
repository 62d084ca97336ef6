"""A job submitted with `ray job submit --working-dir` runs in a folder Ray deletes with its session:
aigc refuses to put a tracking store, checkpoints or a dataset path there."""

from __future__ import annotations

from pathlib import Path

import pytest

from aigc import ray_package
from aigc.config import load_config
from aigc.tracking import TrackingUnavailable, resolve_tracking_uri
from aigc.training.job import TrainError, storage_location

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project root where Ray unpacks a job's working dir; the environment names no store."""
    folder = tmp_path / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123abcd"
    folder.mkdir(parents=True)
    monkeypatch.setenv("AIGC_PROJECT_ROOT", str(folder))
    for var in ("MLFLOW_TRACKING_URI", "AIGC_STORAGE_PATH"):
        monkeypatch.delenv(var, raising=False)
    return folder


def test_ray_package_is_found_from_any_folder_inside_it(package: Path) -> None:
    assert ray_package(package) == package
    assert ray_package(package / "models") == package
    assert ray_package(ROOT) is None


def test_the_default_tracking_store_is_refused_inside_a_package_and_an_explicit_one_is_kept(
    package: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inside = "inside the Ray working-dir package _ray_pkg_0123abcd"
    with pytest.raises(TrackingUnavailable, match=inside) as err:
        resolve_tracking_uri(None)
    assert "platform/runtime-env.yaml" in str(err.value) and "MLFLOW_TRACKING_URI" in str(err.value)
    assert not (package / "mlflow").exists()  # nothing created in the folder Ray deletes
    assert resolve_tracking_uri("http://mlflow:5000") == "http://mlflow:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////shared/mlflow.db")
    assert resolve_tracking_uri(None) == "sqlite:////shared/mlflow.db"


def test_a_relative_storage_path_is_refused_inside_a_package(package: Path) -> None:
    cfg = load_config(ROOT / "models" / "vae.yaml")
    assert cfg.scaling.storage_path == "runs"
    with pytest.raises(TrainError, match="scaling.storage_path 'runs' would put the checkpoints") as err:
        storage_location(cfg, package)
    assert "AIGC_STORAGE_PATH" in str(err.value)
    for durable in ("s3://bucket/runs", "/shared/runs"):
        cfg.scaling.storage_path = durable
        assert storage_location(cfg, package) == durable


def test_the_storage_path_defaults_to_the_environment_and_a_config_value_wins(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AIGC_STORAGE_PATH", "s3://bucket/runs")
    assert load_config(ROOT / "models" / "diffusion.yaml").scaling.storage_path == "s3://bucket/runs"
    given = load_config(ROOT / "models" / "diffusion.yaml", ["scaling.storage_path=/data/runs"])
    assert given.scaling.storage_path == "/data/runs"
    monkeypatch.delenv("AIGC_STORAGE_PATH")
    assert load_config(ROOT / "models" / "diffusion.yaml").scaling.storage_path == "runs"


def test_a_dataset_left_out_of_the_upload_says_why_and_how_to_point_at_it(package: Path) -> None:
    from aigc.training.launcher import train

    overrides = ["data.location=datasets/digits", f"scaling.storage_path={package.parent / 'runs'}"]
    with pytest.raises(TrainError, match="the upload leaves out git-ignored files such as shards") as err:
        train(ROOT / "models" / "vae.yaml", overrides, messages=None)
    assert "--set data.location=s3://" in str(err.value)

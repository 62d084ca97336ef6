"""The repository layout contract (DESIGN §2): top-level data folders are never Python packages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOP_LEVEL = ["platform", "models", "datasets", "mlflow", "k8s"]


@pytest.mark.parametrize("folder", TOP_LEVEL)
def test_top_level_folder_exists_with_readme_and_no_init(folder: str) -> None:
    path = ROOT / folder
    assert path.is_dir(), f"{folder}/ is missing"
    assert (path / "README.md").is_file(), f"{folder}/README.md is missing"
    inits = list(path.rglob("__init__.py"))
    assert not inits, f"{folder}/ must not be a Python package: {inits}"


def test_stdlib_platform_and_real_mlflow_import_from_repo_root() -> None:
    # Run from the repository root, where a stray platform/__init__.py or mlflow/__init__.py would
    # shadow the standard library / the installed mlflow.
    code = (
        "import platform, mlflow, sys; "
        "assert hasattr(platform, 'python_version'), platform.__file__; "
        "assert hasattr(mlflow, 'start_run'), mlflow.__file__; "
        "print(platform.__file__); print(mlflow.__file__)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    platform_file, mlflow_file = out.stdout.split()
    assert not platform_file.startswith(str(ROOT / "platform"))
    assert not mlflow_file.startswith(str(ROOT / "mlflow"))


def test_package_is_importable_under_src() -> None:
    import aigc

    assert Path(aigc.__file__).resolve().is_relative_to(ROOT / "src" / "aigc")

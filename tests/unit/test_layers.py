"""The layers of docs/architecture.md hold: `lint-imports` checks the contracts in pyproject.toml.

The contracts are import-linter's (``[tool.importlinter]``): a module imports only from the layers
below it, function-local imports included, and no two modules of a package import each other in a
circle. The second test plants an upward import inside a function in a copy of the package and
checks that the same contracts catch it, so a configuration that checks nothing cannot pass.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(cwd: Path, src: Path) -> subprocess.CompletedProcess[str]:
    if not LINT_IMPORTS.exists():
        pytest.fail(f"{LINT_IMPORTS} is missing: install the dev extras (make install-dev)")
    env = os.environ | {"PYTHONPATH": str(src)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", str(cwd / "pyproject.toml")],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_package_keeps_its_import_contracts():
    result = lint_imports(ROOT, ROOT / "src")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 2 kept, 0 broken." in result.stdout


def test_an_upward_import_inside_a_function_breaks_the_layers(tmp_path):
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    shutil.copytree(
        ROOT / "src" / "aigc", tmp_path / "src" / "aigc", ignore=shutil.ignore_patterns("__pycache__")
    )
    planted = tmp_path / "src" / "aigc" / "data" / "planted.py"
    planted.write_text("def f():\n    from aigc.registry.versions import parse_ref\n\n    return parse_ref\n")
    result = lint_imports(tmp_path, tmp_path / "src")
    assert result.returncode != 0
    assert "aigc.data is not allowed to import aigc.registry" in result.stdout
    assert "aigc.data.planted -> aigc.registry.versions (l.2)" in result.stdout

"""aigc: train generative image models at cluster scale (model zoo, shards, Ray Train, MLflow, DVC)."""

from __future__ import annotations

import os
from pathlib import Path

__version__ = "0.1.0"


def project_root() -> Path:
    """The aigc project folder that relative paths (datasets/, mlflow/, runs/) resolve against.

    ``AIGC_PROJECT_ROOT`` wins; otherwise the nearest folder at or above the working directory that
    holds a ``pyproject.toml`` naming ``aigc-platform``; otherwise the working directory itself, so a
    pip-installed aigc works anywhere. Always absolute: Ray workers run in another working directory.
    """
    env = os.environ.get("AIGC_PROJECT_ROOT")
    if env:
        return Path(env).expanduser().resolve()
    cwd = Path.cwd().resolve()
    for folder in (cwd, *cwd.parents):
        pyproject = folder / "pyproject.toml"
        if pyproject.is_file():
            try:
                if 'name = "aigc-platform"' in pyproject.read_text(encoding="utf-8"):
                    return folder
            except OSError:
                pass
    return cwd

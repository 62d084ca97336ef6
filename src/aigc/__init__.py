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


#: The prefix of the folders Ray unpacks a job's ``working_dir`` into
#: (``<session>/runtime_resources/working_dir_files/_ray_pkg_<hash>``, ray/_private/runtime_env/
#: packaging.py). ``ray job submit --working-dir .`` runs the job there.
RAY_PACKAGE_PREFIX = "_ray_pkg_"


def ray_package(root: Path | None = None) -> Path | None:
    """The Ray working-dir package ``root`` (default :func:`project_root`) lies in, or None.

    Such a folder is ephemeral: Ray deletes it with its session, and the upload leaves out every
    git-ignored file (datasets/, mlflow/, runs/). A tracking store, checkpoints or shards resolved
    relative to the project root would land in it, or be missing from it.
    """
    root = project_root() if root is None else root
    for folder in (root, *root.parents):
        if folder.name.startswith(RAY_PACKAGE_PREFIX):
            return folder
    return None


#: How to give a job submitted with ``--working-dir`` durable places, in every error that refuses one.
DURABLE_SETTINGS_HINT = (
    "Give the job durable locations: ray job submit --runtime-env platform/runtime-env.yaml (its env_vars "
    "MLFLOW_TRACKING_URI and AIGC_STORAGE_PATH; or runtime_env={'env_vars': {...}}), or --set "
    "tracking.uri=... --set scaling.storage_path=s3://... (an absolute path every node shares also works)"
)

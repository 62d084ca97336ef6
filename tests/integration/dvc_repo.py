"""A real git + DVC repository in a temp folder, for the pipeline tests (test_dvc, test_pipeline).

The commands run with the venv's `aigc` and `dvc` first on PATH, no analytics, their own DVC site
cache and config home (so tests never share DVC state with the machine or each other), and a git
identity (`dvc exp` needs commits).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def repo_env(base: Path) -> dict[str, str]:
    """The environment of the repo's commands: this process's, minus the project and store overrides."""
    env = {k: v for k, v in os.environ.items() if k not in ("AIGC_PROJECT_ROOT", "MLFLOW_TRACKING_URI")}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        DVC_NO_ANALYTICS="1",
        DVC_SITE_CACHE_DIR=str(base / "site-cache"),
        XDG_CONFIG_HOME=str(base / "config"),
        OMP_NUM_THREADS="1",
        GIT_CONFIG_NOSYSTEM="1",
    )
    return env


def run(repo: Path, env: dict[str, str], *args: str, timeout: float = 600) -> str:
    """``args`` in ``repo``; its stdout + stderr, or an assertion error showing both."""
    proc = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


def dvc(repo: Path, env: dict[str, str], *args: str) -> str:
    return run(repo, env, str(BIN / "dvc"), *args)


def init_repo(repo: Path, env: dict[str, str], message: str = "pipeline") -> str:
    """``git init`` + ``dvc init`` in ``repo`` and a first commit of what is there; its sha."""
    run(repo, env, "git", "init", "-q")
    run(repo, env, "git", "config", "user.email", "test@example.invalid")
    run(repo, env, "git", "config", "user.name", "aigc test")
    dvc(repo, env, "init", "-q")
    run(repo, env, "git", "add", "-A")
    run(repo, env, "git", "commit", "-q", "-m", message)
    return run(repo, env, "git", "rev-parse", "HEAD").strip()

"""mlflow/start-server.sh --auth: the generated basic-auth ini, read by MLflow's own reader.

The script is run for real with MLFLOW_BIN pointing at a stand-in server: a Python process that
loads the ini through ``mlflow.server.auth.config.read_auth_config`` (MLflow's configparser
reader, the one the real server uses) and reports what it saw, so no server has to start.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "mlflow" / "start-server.sh"

STAND_IN = """\
import json, os, stat, sys
from mlflow.server.auth.config import read_auth_config
path = os.environ["MLFLOW_AUTH_CONFIG_PATH"]
cfg = read_auth_config()
print(json.dumps({
    "path": path,
    "database_uri": cfg.database_uri,
    "file_mode": stat.S_IMODE(os.stat(path).st_mode),
    "dir_mode": stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode),
}))
"""


def _run(tmp_path: Path, database_uri: str) -> tuple[dict, Path]:
    stand_in = tmp_path / "mlflow-stand-in"
    stand_in.write_text(f"#!{sys.executable}\n{STAND_IN}")
    stand_in.chmod(0o755)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {
        **os.environ,
        "MLFLOW_BIN": str(stand_in),
        "MLFLOW_AUTH_DATABASE_URI": database_uri,
        "MLFLOW_AUTH_ADMIN_PASSWORD": "admin-pw",
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "k",
        "TMPDIR": str(scratch),
    }
    env.pop("MLFLOW_AUTH_CONFIG_PATH", None)
    out = subprocess.run(["bash", str(SCRIPT), "--auth"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1]), scratch


def test_percent_encoded_password_reaches_mlflow_unchanged(tmp_path: Path) -> None:
    uri = "postgresql://aigc:p%40ss%25w@db:5432/auth"
    seen, _ = _run(tmp_path, uri)
    assert seen["database_uri"] == uri


def test_generated_ini_is_private_and_removed_on_exit(tmp_path: Path) -> None:
    seen, scratch = _run(tmp_path, "postgresql://aigc:secret@db:5432/auth")
    assert seen["file_mode"] & (stat.S_IRWXG | stat.S_IRWXO) == 0
    assert seen["dir_mode"] & (stat.S_IRWXG | stat.S_IRWXO) == 0
    assert not Path(seen["path"]).exists()
    assert list(scratch.iterdir()) == []

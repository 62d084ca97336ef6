"""aigc.tracking without a store: params, tags, URIs, truncation, git sha, the server command line."""

from __future__ import annotations

import getpass
import os
import subprocess
import sys
from pathlib import Path

import pytest

from aigc.config import RunConfig
from aigc.tracking import (
    default_artifact_root,
    flatten_params,
    git_sha,
    lineage_tags,
    mlflow_server_command,
    resolve_tracking_uri,
    truncate,
)
from aigc.tracking.backend import is_local_store, sqlite_path

ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------ flatten_params


def test_flatten_params_dotted_keys_and_string_values() -> None:
    cfg = {"model": {"family": "vae", "latent": {"dim": 8}}, "lr": 0.001, "amp": True, "ckpt": None}
    cfg["sizes"] = [32, 64]
    cfg["empty"] = {}
    assert flatten_params(cfg) == {
        "model.family": "vae",
        "model.latent.dim": "8",
        "lr": "0.001",
        "amp": "true",
        "ckpt": "null",
        "sizes": "[32, 64]",
        "empty": "{}",
    }


def test_flatten_params_accepts_a_pydantic_config_and_keeps_every_leaf() -> None:
    cfg = RunConfig()
    flat = flatten_params(cfg)
    assert flat["tracking.experiment"] == cfg.tracking.experiment
    assert flat["scaling.num_workers"] == str(cfg.scaling.num_workers)
    assert flat["model.family"] == cfg.model.family
    # Every leaf of the JSON dump is there under its dotted key.
    dumped = cfg.model_dump(mode="json")

    def leaves(d: dict, prefix: str = "") -> set[str]:
        out: set[str] = set()
        for k, v in d.items():
            name = f"{prefix}.{k}" if prefix else k
            out |= leaves(v, name) if isinstance(v, dict) and v else {name}
        return out

    assert set(flat) == leaves(dumped)


def test_flatten_params_truncates_long_values_to_mlflow_limit() -> None:
    flat = flatten_params({"data": {"captions": "x" * 10_000}})
    value = flat["data.captions"]
    assert len(value) == 6000
    assert "chars truncated" in value
    assert value.startswith("xxxx")


def test_flatten_params_rejects_a_key_mlflow_would_refuse() -> None:
    with pytest.raises(ValueError, match="longer than MLflow's 250"):
        flatten_params({"a" * 300: 1})


def test_flatten_params_rejects_non_mappings() -> None:
    with pytest.raises(TypeError, match="mapping or a pydantic model"):
        flatten_params([1, 2])


# -------------------------------------------------------------------------------------- truncation


@pytest.mark.parametrize("length", [0, 10, 59, 60, 61, 1000, 123_456])
@pytest.mark.parametrize("keep_tail", [False, True])
def test_truncate_never_exceeds_the_limit(length: int, keep_tail: bool) -> None:
    text = "".join(chr(97 + i % 26) for i in range(length))
    out = truncate(text, 60, keep_tail=keep_tail)
    assert len(out) == min(length, 60)
    if length <= 60:
        assert out == text
    else:
        removed = int(out.split("...[")[1].split(" chars")[0])
        kept = out.replace(f"...[{removed} chars truncated]...", "")
        assert len(kept) + removed == length  # the marker tells the truth
        assert text.endswith(kept) if keep_tail else text.startswith(kept)


# ----------------------------------------------------------------------------------------- lineage


def test_lineage_tags_names_and_values() -> None:
    tags = lineage_tags("diffusion", "digits", "0123456789abcdef0123456789abcdef.dir", 2, "abc123")
    assert tags == {
        "aigc.family": "diffusion",
        "aigc.data.name": "digits",
        "aigc.data.version": "0123456789abcdef0123456789abcdef.dir",
        "aigc.ray.workers": "2",
        "aigc.git_sha": "abc123",
    }


def test_lineage_tags_leave_out_unknown_values() -> None:
    tags = lineage_tags("gan", None, None, None, None)
    assert tags == {"aigc.family": "gan"}


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


def test_git_sha_of_a_real_repo_marks_dirty_worktrees(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    assert git_sha(repo) is None  # not a repository
    _git(repo, "init", "-q")
    assert git_sha(repo) is None  # no commit yet
    (repo / "a.txt").write_text("one\n")
    _git(repo, "add", "a.txt")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qm", "first")
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True
    ).stdout.strip()
    assert git_sha(repo) == head
    (repo / "untracked.txt").write_text("ignored\n")
    assert git_sha(repo) == head  # untracked files do not make it dirty
    (repo / "a.txt").write_text("two\n")
    assert git_sha(repo) == f"{head}-dirty"


# ------------------------------------------------------------------------- MLflow's own run context


def test_source_tags_are_what_the_mlflow_ui_shows_as_source_commit_and_creator() -> None:
    from aigc.tracking import source_tags

    tags = source_tags("aigc train models/vae.yaml", "0123abcd-dirty", user="ada")
    assert tags == {
        "mlflow.source.name": "aigc train models/vae.yaml",
        "mlflow.source.type": "LOCAL",
        "mlflow.source.git.commit": "0123abcd",  # MLflow expects a commit id: no "-dirty" mark
        "mlflow.user": "ada",
    }
    # Unknown values are left out; the user defaults to the login name.
    unknown = source_tags("aigc train", None)
    assert "mlflow.source.git.commit" not in unknown
    assert unknown["mlflow.user"] == getpass.getuser()


def test_spelled_out_mlflow_tag_names_are_mlflows_own() -> None:
    """aigc.tracking.context spells MLflow's tag names out (the driver builds tags without
    importing MLflow): each must still be MLflow's."""
    from mlflow.entities import SourceType
    from mlflow.utils import mlflow_tags

    from aigc.tracking import context

    assert context.TAG_RUN_NOTE == mlflow_tags.MLFLOW_RUN_NOTE
    assert context.TAG_SOURCE_NAME == mlflow_tags.MLFLOW_SOURCE_NAME
    assert context.TAG_SOURCE_TYPE == mlflow_tags.MLFLOW_SOURCE_TYPE
    assert context.TAG_GIT_COMMIT == mlflow_tags.MLFLOW_GIT_COMMIT
    assert context.TAG_USER == mlflow_tags.MLFLOW_USER
    assert SourceType.to_string(SourceType.LOCAL) == context.SOURCE_TYPE_LOCAL


def test_driver_builds_a_runs_tags_without_importing_mlflow() -> None:
    """What ``aigc train``'s driver does before the run is open (config, manifest, tags, description,
    the tokenizer) must not import MLflow: that import (seconds) is the child's
    (aigc.tracking.opener), beside the driver's own start-up. Nor torch: Ray's thread imports it
    for TorchTrainer, after the tokenizer is built."""
    code = (
        "import sys\n"
        "from aigc import tracking\n"
        "from aigc.training import launcher\n"
        "from aigc.data.captions_io import read_captions\n"
        "from aigc.models.tokenizer import Tokenizer\n"
        "tracking.lineage_tags('vae', 'digits', 'abc', 1, 'sha')\n"
        "tracking.source_tags(tracking.command_line(), 'sha')\n"
        "tracking.data_modified_tags(['a: size'])\n"
        "tracking.run_description('vae', max_steps=1, workers=1, data='d')\n"
        "tracking.resolve_tracking_uri('sqlite:///x.db')\n"
        "tracking.RunOpener\n"
        "Tokenizer.build(['a b'])\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mlflow', 'torch')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout[:2000]


def test_command_line_reads_as_typed() -> None:
    from aigc.tracking import command_line

    assert command_line(["/venv/bin/aigc", "train", "--set", "trainer.max_steps=5", "a b"]) == (
        "aigc train --set trainer.max_steps=5 'a b'"
    )
    assert command_line(["/venv/lib/pytest/__main__.py", "-q"]) == "python -m pytest -q"


def test_run_description_while_running_and_when_done() -> None:
    from aigc.tracking import run_description

    planned = run_description("gan", max_steps=200, workers=2, data="`digits` version `abc`")
    assert planned == (
        "**gan** trained with `aigc train`: 200 steps planned on 2 Ray worker(s), "
        "data `digits` version `abc`."
    )
    done = run_description(
        "gan",
        max_steps=200,
        workers=2,
        data="`digits`",
        steps=200,
        eval_figures={"eval/fd": 12.34567, "eval/clip_score": 0.5, "evaluator_hash": "x", "seed": 0},
        sample_grid="samples-final.png",
        notes=["Data: 3 samples skipped"],
    )
    lines = done.splitlines()
    assert lines[0].startswith("**gan** trained with `aigc train`: 200 of 200 steps")
    # Every eval/* figure in a Markdown table, in name order; provenance keys are not figures.
    table = lines[lines.index("| figure | value |") :]
    assert table[1:4] == ["| --- | --- |", "| eval/clip_score | 0.5 |", "| eval/fd | 12.35 |"]
    assert "evaluator_hash" not in done
    assert "Final sample grid: artifact `samples-final.png`." in lines
    assert lines[-1] == "- Data: 3 samples skipped"


@pytest.mark.parametrize(
    ("current", "set_it"),
    [
        (None, True),
        ("", True),
        ("genai_development_inferred", True),  # what the UI guessed: not a choice
        ("no_inferred_type", True),
        ("genai_development", False),  # somebody chose it in the UI
        ("custom_model_development", False),
    ],
)
def test_experiment_kind_replaces_only_a_missing_or_guessed_kind(current: str | None, set_it: bool) -> None:
    from aigc.tracking.context import needs_experiment_kind

    assert needs_experiment_kind(current) is set_it


# --------------------------------------------------------------------------------------------- URIs


@pytest.fixture()
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("AIGC_PROJECT_ROOT", str(tmp_path / "proj"))
    return tmp_path / "proj"


def test_default_uri_is_absolute_sqlite_in_project_mlflow_folder(clean_env: Path) -> None:
    uri = resolve_tracking_uri()
    assert uri == f"sqlite:///{clean_env.resolve()}/mlflow/mlflow.db"
    assert sqlite_path(uri).is_absolute()
    assert (clean_env / "mlflow").is_dir()  # sqlite cannot create the folder itself
    assert default_artifact_root() == (clean_env.resolve() / "mlflow" / "artifacts").as_uri()
    assert default_artifact_root(uri) == default_artifact_root()


def test_env_overrides_default_and_explicit_overrides_env(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert resolve_tracking_uri() == "http://mlflow.example:5000"
    assert resolve_tracking_uri("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"


def test_relative_uris_become_absolute(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    here = tmp_path.resolve()
    assert resolve_tracking_uri("sqlite:///rel/m.db") == f"sqlite:///{here}/rel/m.db"
    assert resolve_tracking_uri("sqlite:///m.db?timeout=30") == f"sqlite:///{here}/m.db?timeout=30"
    assert resolve_tracking_uri("mlruns") == (here / "mlruns").as_uri()
    assert resolve_tracking_uri("file:mlruns") == (here / "mlruns").as_uri()
    assert resolve_tracking_uri("file:///abs/mlruns") == "file:///abs/mlruns"
    for remote in ("databricks", "databricks://profile", "postgresql://u@db/mlflow", "https://m.example"):
        assert resolve_tracking_uri(remote) == remote
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    assert resolve_tracking_uri() == f"sqlite:///{here}/env.db"
    # Resolved once in the driver, the URI means the same store from any working directory.
    monkeypatch.chdir(ROOT)
    assert resolve_tracking_uri(f"sqlite:///{here}/env.db") == f"sqlite:///{here}/env.db"


def test_sqlite_path_forms() -> None:
    assert sqlite_path("sqlite:////abs/m.db") == Path("/abs/m.db")
    assert sqlite_path("sqlite://") is None
    assert sqlite_path("sqlite:///:memory:") is None
    with pytest.raises(ValueError, match="sqlite:///relative.db"):
        sqlite_path("sqlite://host/m.db")


def test_artifact_root_sits_next_to_a_sqlite_store() -> None:
    assert default_artifact_root("sqlite:////data/store/m.db") == "file:///data/store/artifacts"


def test_local_and_remote_stores() -> None:
    assert is_local_store("sqlite:////a.db")
    assert is_local_store("file:///mlruns")
    assert not is_local_store("http://127.0.0.1:5000")
    assert not is_local_store("https://mlflow.example")
    assert not is_local_store("databricks")


# -------------------------------------------------------------------------------- server command


def test_ui_command_binds_loopback_over_the_local_store() -> None:
    cmd = mlflow_server_command("sqlite:////data/m.db", port=5123)
    assert cmd[1:4] == ["-m", "mlflow", "server"]
    assert "--no-serve-artifacts" in cmd
    i = cmd.index("--backend-store-uri")
    assert cmd[i + 1] == "sqlite:////data/m.db"
    assert cmd[cmd.index("--default-artifact-root") + 1] == "file:///data/artifacts"
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--port") + 1] == "5123"
    with pytest.raises(ValueError, match="tracking server already"):
        mlflow_server_command("http://127.0.0.1:5000")


def test_start_server_script_defaults_to_loopback_and_takes_overrides() -> None:
    script = ROOT / "mlflow" / "start-server.sh"
    assert os.access(script, os.X_OK)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}

    def dry(*args: str, **extra_env: str) -> str:
        out = subprocess.run(
            [str(script), "--dry-run", *args],
            env={**env, **extra_env},
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout

    default = dry()
    assert "--host 127.0.0.1" in default and "--port 5000" in default
    assert f"sqlite:///{ROOT}/mlflow/mlflow.db" in default
    assert f"--artifacts-destination {ROOT}/mlflow/artifacts" in default
    assert "--host 0.0.0.0" in dry(MLFLOW_HOST="0.0.0.0")
    flagged = dry("--host", "10.1.2.3", "--port", "6001", MLFLOW_HOST="0.0.0.0")
    assert "--host 10.1.2.3" in flagged and "--port 6001" in flagged
    assert "--allowed-hosts mlflow.ns.svc" in dry(MLFLOW_ALLOWED_HOSTS="mlflow.ns.svc")
    bad = subprocess.run([str(script), "--bogus"], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "--bogus" in bad.stderr
    authed = dry("--auth", MLFLOW_AUTH_DATABASE_URI="postgresql://db/auth")
    assert "--app-name basic-auth" in authed and "database_uri = postgresql://db/auth" in authed
    no_secrets = subprocess.run([str(script), "--auth"], env=env, capture_output=True, text=True)
    assert no_secrets.returncode == 2
    assert "MLFLOW_AUTH_ADMIN_PASSWORD MLFLOW_FLASK_SERVER_SECRET_KEY" in no_secrets.stderr


# ---------------------------------------------------------------------------------------- imports


def test_light_paths_do_not_import_mlflow_and_every_export_resolves() -> None:
    # `aigc --help` and `aigc ui` stay fast: mlflow takes seconds to import.
    code = (
        "import sys, aigc.tracking, aigc.tracking.backend, aigc.tracking.server, aigc.cli.runs; "
        "assert 'mlflow' not in sys.modules, 'mlflow imported'; "
        "[getattr(aigc.tracking, n) for n in aigc.tracking.__all__]; "
        "assert 'mlflow' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, capture_output=True)

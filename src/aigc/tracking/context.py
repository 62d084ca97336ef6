"""What MLflow's own UI reads about a run and its experiment, filled in from what aigc knows.

The UI shows a run's "Source" from ``mlflow.source.name`` and ``mlflow.source.type``, "Created by"
from ``mlflow.user``, its commit from ``mlflow.source.git.commit`` and its description from
``mlflow.note.content`` (Markdown). ``mlflow.start_run`` fills the first four in from the process;
aigc creates runs with ``MlflowClient.create_run`` (see :mod:`aigc.tracking.lifecycle`), which does not,
so they are made here. ``mlflow.experimentKind=custom_model_development`` says what the experiment
is (MLflow otherwise guesses, and a guess of GenAI opens it with traces and judges). The UI of
MLflow 3.17 also has a browser-wide "GenAI | Model training" switch that wins over the tag; the
links aigc prints select the model-training view in their URL (:func:`aigc.tracking.server.ui_url`).
"""

from __future__ import annotations

import getpass
import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from aigc.contract import eval_entries

__all__ = [
    "EXPERIMENT_KIND",
    "TAG_EXPERIMENT_KIND",
    "TAG_RUN_NOTE",
    "command_line",
    "needs_experiment_kind",
    "run_description",
    "source_tags",
]

TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# MLflow's tag names (mlflow.utils.mlflow_tags: MLFLOW_RUN_NOTE, MLFLOW_SOURCE_NAME, ...) and
# SourceType.LOCAL's string, spelled out so that the driver builds a run's tags without importing
# MLflow (seconds; the run is opened in a child process, see aigc.tracking.opener).
# tests/unit/test_tracking.py checks each against MLflow's own.
TAG_RUN_NOTE = "mlflow.note.content"
#: MLflow's tag that nests a run under another in the UI (a sweep's trials under its parent run).
TAG_PARENT_RUN = "mlflow.parentRunId"
TAG_SOURCE_NAME = "mlflow.source.name"
TAG_SOURCE_TYPE = "mlflow.source.type"
TAG_GIT_COMMIT = "mlflow.source.git.commit"
TAG_USER = "mlflow.user"
SOURCE_TYPE_LOCAL = "LOCAL"


def needs_experiment_kind(current: str | None) -> bool:
    """Whether an experiment whose ``mlflow.experimentKind`` is ``current`` should get aigc's kind:
    when it has none, or only one the UI guessed (``*_inferred``, ``no_inferred_type``); a kind
    somebody chose in the UI stays."""
    return not current or current.endswith("_inferred") or current == "no_inferred_type"


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command that started this process as a user would type it: ``aigc train models/...``."""
    argv = list(sys.argv if argv is None else argv)
    if not argv:
        return "python"
    program = Path(argv[0])
    # `python -m pkg` puts pkg/__main__.py in argv[0]; the console scripts put their own path.
    head = ["python", "-m", program.parent.name] if program.name == "__main__.py" else [program.name]
    return shlex.join([*head, *argv[1:]])


def _login() -> str | None:
    try:
        return getpass.getuser()
    except (KeyError, OSError, ImportError):  # no passwd entry (containers), no pwd module
        return os.environ.get("USER") or None


def source_tags(command: str, git_sha: str | None, user: str | None = None) -> dict[str, str]:
    """MLflow's context tags of a run started by ``command`` from code at ``git_sha`` (aigc's
    ``aigc.git_sha``, whose ``-dirty`` mark is dropped: MLflow expects a commit id) by ``user``
    (default: the login name). The source type is LOCAL, a process started by hand, as
    ``mlflow.start_run`` records a script. Unknown values are left out."""
    tags = {
        TAG_SOURCE_NAME: command,
        TAG_SOURCE_TYPE: SOURCE_TYPE_LOCAL,
        TAG_GIT_COMMIT: git_sha.removesuffix("-dirty") if git_sha else None,
        TAG_USER: user or _login(),
    }
    return {k: v for k, v in tags.items() if v}


def run_description(
    family: str,
    *,
    max_steps: int,
    workers: int,
    data: str,
    steps: int | None = None,
    eval_figures: Mapping[str, float] | None = None,
    sample_grid: str | None = None,
    notes: Sequence[str] = (),
) -> str:
    """The run's description (``mlflow.note.content``, Markdown): the family, the steps (planned
    while ``steps`` is None, else done), the data, every ``eval/*`` figure, the artifact path of the
    final sample grid and ``notes`` (what went wrong with the data, one line each)."""
    done = f"{steps} of {max_steps} steps" if steps is not None else f"{max_steps} steps planned"
    lines = [f"**{family}** trained with `aigc train`: {done} on {workers} Ray worker(s), data {data}."]
    figures = dict(sorted(eval_entries(eval_figures or {}).items()))
    if figures:
        lines += ["", "| figure | value |", "| --- | --- |"]
        lines += [f"| {k} | {v:.4g} |" for k, v in figures.items()]
    if sample_grid:
        lines += ["", f"Final sample grid: artifact `{sample_grid}`."]
    if notes:
        lines += ["", *(f"- {note}" for note in notes)]
    return "\n".join(lines)

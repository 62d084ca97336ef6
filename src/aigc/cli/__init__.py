"""The ``aigc`` command line: one Typer app, one small module per command group.

Commands only parse arguments and print; the work is done by plain functions in the library.
"""

from __future__ import annotations

import typer

from aigc.cli import data as data_cmds
from aigc.cli import evaluate as evaluate_cmds
from aigc.cli import export as export_cmds
from aigc.cli import quickstart as quickstart_cmds
from aigc.cli import registry as registry_cmds
from aigc.cli import runs as runs_cmds
from aigc.cli import serve as serve_cmds
from aigc.cli import sweep as sweep_cmds
from aigc.cli import train as train_cmds

app = typer.Typer(
    name="aigc",
    help="Train generative image models: data shards, model zoo, Ray Train, MLflow, DVC.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(data_cmds.app, name="data")
evaluate_cmds.register(app)
export_cmds.register(app)
quickstart_cmds.register(app)
registry_cmds.register(app)
runs_cmds.register(app)
serve_cmds.register(app)
sweep_cmds.register(app)
train_cmds.register(app)


def main() -> None:
    """Console-script entry point."""
    app()

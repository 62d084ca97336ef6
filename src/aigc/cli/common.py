"""Helpers shared by the CLI command modules."""

from __future__ import annotations

from typing import Any, NoReturn

import typer
from pydantic import BaseModel


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``error: message`` to stderr and exit with ``code`` (no traceback)."""
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


def field_option(model: type[BaseModel], field: str, *flags: str, **kwargs: Any) -> Any:
    """A ``typer.Option`` whose default and help come from ``model``'s field: a command's flag
    restates neither, so ``--help`` shows the default the config really has."""
    info = model.model_fields[field]
    kwargs.setdefault("help", info.description)
    return typer.Option(info.get_default(call_default_factory=True), *flags, **kwargs)

"""Helpers shared by the CLI command modules."""

from __future__ import annotations

import dataclasses
from typing import Any, NoReturn

import typer
from pydantic import BaseModel


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``error: message`` to stderr and exit with ``code`` (no traceback)."""
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


def declared_field(decl: type, name: str) -> tuple[Any, str | None]:
    """The default and the help of field ``name`` of a pydantic model (its ``description``) or of a
    dataclass (its ``metadata["help"]``, as :class:`aigc.training.TrainRequest` declares them)."""
    if issubclass(decl, BaseModel):
        info = decl.model_fields[name]
        return info.get_default(call_default_factory=True), info.description
    f = next(f for f in dataclasses.fields(decl) if f.name == name)
    return (f.default_factory() if f.default is dataclasses.MISSING else f.default), f.metadata.get("help")


def field_option(decl: type, field: str, *flags: str, **kwargs: Any) -> Any:
    """A ``typer.Option`` whose default and help come from ``decl``'s field (:func:`declared_field`):
    a command's flag restates neither, so ``--help`` shows the default the config really has."""
    default, help_text = declared_field(decl, field)
    kwargs.setdefault("help", help_text)
    return typer.Option(default, *flags, **kwargs)

"""Config → MLflow params: dotted keys, string values within MLflow's limits."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

# MLflow 3.17's limits (mlflow.utils.validation): longer values are rejected by the store.
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000
MAX_KEY_LENGTH = 250
MAX_PARAMS_PER_BATCH = 100


def truncate(text: str, limit: int, keep_tail: bool = False) -> str:
    """``text`` cut to at most ``limit`` characters, saying how much was cut.

    Keeps the head by default; ``keep_tail`` keeps the end instead (an error's last lines say the most).
    """
    if len(text) <= limit:
        return text
    removed = len(text) - limit
    while True:  # the marker's length depends on the count it prints: converges in two or three turns
        marker = f"...[{removed} chars truncated]..."
        room = limit - len(marker)
        if room < 0:  # a limit too small for the marker: a plain cut
            return text[len(text) - limit :] if keep_tail else text[:limit]
        if len(text) - room == removed:
            break
        removed = len(text) - room
    return marker + text[len(text) - room :] if keep_tail else text[:room] + marker


def _param_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None or isinstance(value, (bool, int, float)):
        return json.dumps(value)  # None → "null", True → "true": the same spelling as the YAML/JSON config
    if isinstance(value, (list, tuple, Mapping)):
        return json.dumps(value, default=str)
    return str(value)


def flatten_params(cfg: Mapping[str, Any] | Any, prefix: str = "") -> dict[str, str]:
    """A nested config as ``{"dotted.key": "value"}``, ready for ``log_batch``.

    ``cfg`` is a mapping or a pydantic model (dumped with ``mode="json"``). Leaves become strings
    (lists as JSON), values longer than MLflow's 6000 characters are truncated with a marker, and an
    empty sub-mapping is kept as ``"{}"`` so nothing silently disappears. A key longer than MLflow's
    250 characters raises ``ValueError`` naming it.
    """
    if hasattr(cfg, "model_dump"):
        cfg = cfg.model_dump(mode="json")
    if not isinstance(cfg, Mapping):
        raise TypeError(f"flatten_params expects a mapping or a pydantic model, got {type(cfg).__name__}")
    out: dict[str, str] = {}
    for key, value in cfg.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            out.update(flatten_params(value, name))
            continue
        if len(name) > MAX_KEY_LENGTH:
            raise ValueError(f"param key {name!r} is longer than MLflow's {MAX_KEY_LENGTH} characters")
        out[name] = truncate(_param_value(value), MAX_PARAM_VALUE_LENGTH)
    return out


def chunked(items: list[Any], size: int) -> list[list[Any]]:
    """``items`` in consecutive lists of at most ``size`` (MLflow's per-request batch limits)."""
    return [items[i : i + size] for i in range(0, len(items), size)]

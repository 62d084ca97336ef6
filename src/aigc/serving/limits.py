"""Request limits of ``aigc serve`` and the validation of a ``POST /generate`` body.

A request is checked before it reaches the batch queue, so a rejected one never costs model time.
Every rejection is a :class:`RequestRejected` whose JSON body names the limit and its value::

    {"error": "num_samples 40 is over the limit", "limit": "max_num_samples", "value": 16, "got": 40}

Status codes: 413 for a body over ``max_body_bytes``, 400 for a body that is not JSON, 422 for
everything else (a missing or mistyped field, a value over a limit, an unknown option; the unknown
option's answer lists the allowed ones with their types). Values a family checks itself (the
diffusion ``sampler`` name, ``steps`` above the model's training chain) come back from ``generate``
as ``ValueError`` and are answered 422 with its message.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pydantic import Field

from aigc.config import StrictModel

# The fields of a /generate body that are not family options.
BASE_FIELDS: dict[str, str] = {"prompt": "str", "num_samples": "int", "seed": "int | null"}
_TYPE_NAMES = {int: "int", float: "float", str: "str", bool: "bool"}
_MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a 64-bit seed; JSON ints are unbounded


class RequestLimits(StrictModel):
    """What one ``/generate`` request may ask for. Each field is also an ``aigc serve`` flag."""

    max_num_samples: int = Field(16, ge=1, le=1024, description="limit: images per request")
    max_prompt_chars: int = Field(256, ge=1, description="limit: characters of the prompt")
    max_steps: int = Field(200, ge=1, description="limit: sampling steps (families with a `steps` option)")
    max_body_bytes: int = Field(16 * 1024, ge=256, description="limit: bytes of the request body (413 above)")


class RequestRejected(Exception):
    """A request answered with a 4xx; ``body()`` is its JSON answer."""

    def __init__(self, status: int, error: str, limit: str, value: Any = None, **extra: Any):
        super().__init__(error)
        self.status = status
        self.error = error
        self.limit = limit
        self.value = value
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {"error": self.error, "limit": self.limit, "value": self.value, **self.extra}


@dataclass(frozen=True)
class GenerateRequest:
    """A validated ``/generate`` request. ``options`` is sorted ``(name, value)`` pairs, so requests
    with the same options compare (and hash) equal: the batcher groups on it."""

    prompt: str
    num_samples: int = 1
    seed: int | None = None
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def option_dict(self) -> dict[str, Any]:
        return dict(self.options)


def allowed_fields(options: dict[str, type]) -> dict[str, str]:
    """Every field a /generate body may hold, with its JSON type (for the 422 answer)."""
    return {**BASE_FIELDS, **{k: _TYPE_NAMES.get(t, t.__name__) for k, t in options.items()}}


def check_body_size(content_length: str | None, limits: RequestLimits) -> None:
    """413 when the declared ``Content-Length`` is over the limit (before reading the body)."""
    if content_length is None:
        return
    try:
        declared = int(content_length)
    except ValueError:
        raise RequestRejected(400, "Content-Length is not a number", "content_length") from None
    if declared > limits.max_body_bytes:
        raise RequestRejected(
            413,
            f"request body of {declared} bytes is over the limit",
            "max_body_bytes",
            limits.max_body_bytes,
            got=declared,
        )


def parse_generate_request(body: Any, options: dict[str, type], limits: RequestLimits) -> GenerateRequest:
    """The decoded JSON of a ``/generate`` body -> a :class:`GenerateRequest`, or :class:`RequestRejected`.

    ``options`` is the loaded family's ``generate_options`` (name -> type).
    """
    if not isinstance(body, dict):
        raise RequestRejected(422, "the body must be a JSON object", "body", allowed=allowed_fields(options))
    unknown = sorted(set(body) - set(BASE_FIELDS) - set(options))
    if unknown:
        raise RequestRejected(
            422,
            f"unknown field(s) {unknown}",
            "options",
            sorted(options),
            got=unknown,
            allowed=allowed_fields(options),
        )

    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise RequestRejected(
            422, "prompt must be a string ('' for an unconditional sample)", "prompt", got=_kind(prompt)
        )
    if len(prompt) > limits.max_prompt_chars:
        raise RequestRejected(
            422,
            f"prompt of {len(prompt)} characters is over the limit",
            "max_prompt_chars",
            limits.max_prompt_chars,
            got=len(prompt),
        )

    num_samples = body.get("num_samples", 1)
    if not _is_int(num_samples) or num_samples < 1:
        raise RequestRejected(
            422, "num_samples must be an integer >= 1", "num_samples", got=_jsonable(num_samples)
        )
    if num_samples > limits.max_num_samples:
        raise RequestRejected(
            422,
            f"num_samples {num_samples} is over the limit",
            "max_num_samples",
            limits.max_num_samples,
            got=num_samples,
        )

    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or not 0 <= seed <= _MAX_SEED):
        raise RequestRejected(
            422, f"seed must be null or an integer in 0..{_MAX_SEED}", "seed", got=_jsonable(seed)
        )

    chosen: dict[str, Any] = {}
    for name, kind in options.items():
        if name not in body or body[name] is None:  # None: the model's default
            continue
        chosen[name] = _coerce_option(name, body[name], kind, options)
    steps = chosen.get("steps")
    if steps is not None and not 1 <= steps <= limits.max_steps:
        raise RequestRejected(
            422,
            f"steps {steps} is outside 1..{limits.max_steps}",
            "max_steps",
            limits.max_steps,
            got=steps,
        )
    return GenerateRequest(prompt, int(num_samples), seed, tuple(sorted(chosen.items())))


def _coerce_option(name: str, value: Any, kind: type, options: dict[str, type]) -> Any:
    """``value`` as ``kind``: ints stay ints (no bools), floats take ints, finite values only."""
    ok = (
        (kind is int and _is_int(value))
        or (kind is float and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (kind is str and isinstance(value, str))
        or (kind is bool and isinstance(value, bool))
    )
    if ok and kind is float and not math.isfinite(value):
        ok = False
    if not ok:
        raise RequestRejected(
            422,
            f"option {name} must be {_TYPE_NAMES.get(kind, kind.__name__)}, got {_kind(value)}",
            "options",
            sorted(options),
            got={name: _jsonable(value)},
            allowed=allowed_fields(options),
        )
    return kind(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _jsonable(value: Any) -> Any:
    return value if isinstance(value, (int, float, str, bool, type(None))) else repr(value)[:80]

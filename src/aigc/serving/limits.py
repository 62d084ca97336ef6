"""Request limits of ``aigc serve`` and the validation of a ``POST /generate`` body.

A request is checked before it reaches the batch queue, so a rejected one never costs model time.
Every rejection is a :class:`RequestRejected` whose JSON body names the limit and its value::

    {"error": "num_samples 40 is over the limit", "limit": "max_num_samples", "value": 16, "got": 40}

Status codes: 413 for a body over ``max_body_bytes``, 400 for a body that is not JSON, 422 for
everything else (a missing or mistyped field, a value over a limit, an unknown option; the unknown
option's answer lists the allowed ones with their types). Values a family checks itself (the
diffusion ``sampler`` name, ``steps`` above the model's training chain) come back from ``generate``
as ``ValueError`` and are answered 422 with its message.

Edits (``GenerativeModule.edit_modes``) are checked here too, against the model the replica serves:

- image-to-image: ``init_image`` (base64 PNG, optionally a ``data:image/png;base64,`` URL),
  ``strength`` in [0, 1]; inpainting: ``mask`` too (base64 PNG, grey >= 128 = regenerate);
- interpolation: ``"interpolate": {"prompt_b", "seed_b", "frames"}`` from ``prompt`` and ``seed``.

Each image is at most ``max_image_bytes`` once decoded (limit ``max_image_bytes``), a PNG (limit
``image_format``, value ``["PNG"]``) of exactly the model's size (limit ``image_size``, value
``[size, size]``; it is never resized: checked from the header, before any pixel is decoded);
``frames`` is 2..``max_frames`` (limit ``max_frames``); ``strength`` is in [0, 1] (limit
``strength``, value ``[0, 1]``). A mode the family does not support is answered 422 with limit
``edit_modes``, its value the modes the family supports and the error naming the family.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import Field

from aigc.config import StrictModel
from aigc.data.images import (
    WIRE_FORMATS,
    ImageInputError,
    decode_base64_image,
    image_pixels,
    mask_pixels,
    open_image,
)

# The fields of a /generate body that are not family options.
BASE_FIELDS: dict[str, str] = {"prompt": "str", "num_samples": "int", "seed": "int | null"}
# The edit fields, each listed in ``allowed`` for a family with the mode that uses it.
EDIT_FIELDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "init_image": ("str (base64 PNG) | null", ("img2img", "inpaint")),
    "mask": ("str (base64 PNG) | null", ("inpaint",)),
    "strength": ("float | null", ("img2img", "inpaint")),
    "interpolate": ("{prompt_b: str, seed_b: int, frames: int} | null", ("interpolate",)),
}
INTERPOLATE_FIELDS = ("prompt_b", "seed_b", "frames")
#: frames of an interpolation that names none (GenerativeModule.interpolate's default), at most max_frames
DEFAULT_FRAMES = 8
_TYPE_NAMES = {int: "int", float: "float", str: "str", bool: "bool"}
_MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a 64-bit seed; JSON ints are unbounded


class RequestLimits(StrictModel):
    """What one ``/generate`` request may ask for. Each field is also an ``aigc serve`` flag."""

    max_num_samples: int = Field(16, ge=1, le=1024, description="limit: images per request")
    max_prompt_chars: int = Field(256, ge=1, description="limit: characters of the prompt")
    max_steps: int = Field(200, ge=1, description="limit: sampling steps (families with a `steps` option)")
    max_body_bytes: int = Field(
        1024 * 1024,
        ge=256,
        description="limit: bytes of the request body (413 above); room for an init image and a mask",
    )
    max_image_bytes: int = Field(
        256 * 1024, ge=64, description="limit: bytes of each decoded image (init_image, mask)"
    )
    max_frames: int = Field(16, ge=2, le=1024, description="limit: frames of an interpolation")


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
class Pixels:
    """Decoded pixels as bytes (hashable, comparable): uint8 ``(C, H, W)`` images, bool
    ``(1, H, W)`` masks."""

    shape: tuple[int, ...]
    dtype: str
    data: bytes

    @classmethod
    def of(cls, arr: np.ndarray) -> Pixels:
        return cls(tuple(arr.shape), arr.dtype.str, arr.tobytes())

    def array(self) -> np.ndarray:
        return np.frombuffer(self.data, dtype=np.dtype(self.dtype)).reshape(self.shape)


@dataclass(frozen=True)
class Interpolation:
    """``GenerativeModule.interpolate`` from the request's ``(prompt, seed)`` to ``(prompt_b, seed_b)``."""

    prompt_b: str
    seed_b: int
    frames: int


@dataclass(frozen=True)
class GenerateRequest:
    """A validated ``/generate`` request. ``options`` is sorted ``(name, value)`` pairs, so requests
    with the same options compare (and hash) equal: the batcher groups on it.

    An edit (``init_image``, with ``mask`` for inpainting) or an ``interpolate`` request is
    :attr:`alone`: the batcher gives it a model call of its own. An interpolation's ``seed`` is
    never None (default 0)."""

    prompt: str
    num_samples: int = 1
    seed: int | None = None
    options: tuple[tuple[str, Any], ...] = ()
    init_image: Pixels | None = None
    mask: Pixels | None = None
    strength: float | None = None
    interpolate: Interpolation | None = None

    @property
    def option_dict(self) -> dict[str, Any]:
        return dict(self.options)

    @property
    def alone(self) -> bool:
        return self.init_image is not None or self.interpolate is not None


def allowed_fields(
    options: dict[str, type], edit_modes: frozenset[str] | set[str] = frozenset()
) -> dict[str, str]:
    """Every field a /generate body may hold, with its JSON type (for the 422 answer): the base
    fields, the edit fields of the family's ``edit_modes``, its options."""
    edits = {k: kind for k, (kind, modes) in EDIT_FIELDS.items() if set(modes) & set(edit_modes)}
    return {**BASE_FIELDS, **edits, **{k: _TYPE_NAMES.get(t, t.__name__) for k, t in options.items()}}


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


def parse_generate_request(
    body: Any, options: dict[str, type], limits: RequestLimits, model: Any = None
) -> GenerateRequest:
    """The decoded JSON of a ``/generate`` body -> a :class:`GenerateRequest`, or :class:`RequestRejected`.

    ``options`` is the loaded family's ``generate_options`` (name -> type); ``model`` the loaded
    module (its ``family``, ``edit_modes``, ``image_size`` and ``channels`` check the edit fields;
    None: a model without edits).
    """
    edit_modes = frozenset(getattr(model, "edit_modes", ()))
    allowed = allowed_fields(options, edit_modes)
    if not isinstance(body, dict):
        raise RequestRejected(422, "the body must be a JSON object", "body", allowed=allowed)
    # An edit field of a family without its mode is no unknown field: it is answered below, naming
    # what the family supports.
    unknown = sorted(set(body) - set(BASE_FIELDS) - set(EDIT_FIELDS) - set(options))
    if unknown:
        raise RequestRejected(
            422,
            f"unknown field(s) {unknown}",
            "options",
            sorted(options),
            got=unknown,
            allowed=allowed,
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
    request = GenerateRequest(prompt, int(num_samples), seed, tuple(sorted(chosen.items())))
    if body.get("interpolate") is not None:
        return _interpolation(body, request, model, limits)
    return _edit(body, request, model, limits)


def _require_mode(model: Any, mode: str, field: str) -> None:
    """422 naming the family and the modes it supports, unless ``model`` supports ``mode``."""
    modes = sorted(getattr(model, "edit_modes", ()))
    if mode not in modes:
        family = getattr(model, "family", None)
        who = f"family {family!r}" if family else "the served model"
        raise RequestRejected(
            422,
            f"{who} does not support {mode} ({field}); its editing operations: {', '.join(modes) or 'none'}",
            "edit_modes",
            modes,
            got=mode,
        )


def _edit(body: dict, request: GenerateRequest, model: Any, limits: RequestLimits) -> GenerateRequest:
    """``request`` with the image-to-image / inpainting fields of ``body`` (none: unchanged)."""
    init, mask, strength = body.get("init_image"), body.get("mask"), body.get("strength")
    if init is None:
        for name, value in (("mask", mask), ("strength", strength)):
            if value is not None:
                raise RequestRejected(
                    422, f"{name} needs init_image: the image it edits", name, got=_kind(value)
                )
        return request
    _require_mode(model, "img2img" if mask is None else "inpaint", "init_image" if mask is None else "mask")
    if strength is not None and (
        isinstance(strength, bool)
        or not isinstance(strength, (int, float))
        or not math.isfinite(strength)
        or not 0 <= strength <= 1
    ):
        raise RequestRejected(
            422, "strength must be a number in [0, 1]", "strength", [0, 1], got=_jsonable(strength)
        )
    pixels = Pixels.of(image_pixels(_image(init, "init_image", model, limits), model.channels))
    mask_pixels_ = None if mask is None else Pixels.of(mask_pixels(_image(mask, "mask", model, limits)))
    return GenerateRequest(
        request.prompt,
        request.num_samples,
        request.seed,
        request.options,
        init_image=pixels,
        mask=mask_pixels_,
        strength=None if strength is None else float(strength),
    )


def _image(value: Any, field: str, model: Any, limits: RequestLimits):
    """A base64 PNG field decoded and checked (bytes, format, the model's size), or 422."""
    try:
        data = decode_base64_image(value, what=field, max_bytes=limits.max_image_bytes)
        return open_image(data, what=field, size=model.image_size, formats=WIRE_FORMATS)
    except ImageInputError as err:
        extra = {} if err.got is None else {"got": err.got}
        raise RequestRejected(422, str(err), err.limit, err.value, **extra) from None


def _interpolation(
    body: dict, request: GenerateRequest, model: Any, limits: RequestLimits
) -> GenerateRequest:
    """``request`` as an interpolation from ``(prompt, seed)`` to ``body["interpolate"]``'s end."""
    spec = body["interpolate"]
    _require_mode(model, "interpolate", "interpolate")
    given = [k for k in ("init_image", "mask", "strength") if body.get(k) is not None]
    if given:
        raise RequestRejected(422, f"interpolate takes no {', '.join(given)}", "interpolate", got=given)
    if not isinstance(spec, dict) or set(spec) - set(INTERPOLATE_FIELDS):
        raise RequestRejected(
            422,
            "interpolate must be an object with prompt_b, seed_b and/or frames",
            "interpolate",
            list(INTERPOLATE_FIELDS),
            got=sorted(spec) if isinstance(spec, dict) else _kind(spec),
        )
    if request.num_samples != 1:
        raise RequestRejected(
            422,
            "an interpolation makes `frames` images: num_samples must be 1",
            "interpolate",
            got=request.num_samples,
        )
    seed = 0 if request.seed is None else request.seed
    prompt_b = spec.get("prompt_b")
    prompt_b = request.prompt if prompt_b is None else prompt_b
    if not isinstance(prompt_b, str):
        raise RequestRejected(422, "interpolate.prompt_b must be a string", "prompt_b", got=_kind(prompt_b))
    if len(prompt_b) > limits.max_prompt_chars:
        raise RequestRejected(
            422,
            f"interpolate.prompt_b of {len(prompt_b)} characters is over the limit",
            "max_prompt_chars",
            limits.max_prompt_chars,
            got=len(prompt_b),
        )
    seed_b = spec.get("seed_b")
    seed_b = seed if seed_b is None else seed_b
    if not _is_int(seed_b) or not 0 <= seed_b <= _MAX_SEED:
        raise RequestRejected(
            422,
            f"interpolate.seed_b must be null or an integer in 0..{_MAX_SEED}",
            "seed_b",
            got=_jsonable(seed_b),
        )
    frames = spec.get("frames")
    frames = min(DEFAULT_FRAMES, limits.max_frames) if frames is None else frames
    if not _is_int(frames) or not 2 <= frames <= limits.max_frames:
        raise RequestRejected(
            422,
            f"interpolate.frames must be an integer in 2..{limits.max_frames}",
            "max_frames",
            limits.max_frames,
            got=_jsonable(frames),
        )
    if (prompt_b, seed_b) == (request.prompt, seed):
        raise RequestRejected(
            422,
            "interpolate needs two different end points: give prompt_b and/or seed_b",
            "interpolate",
            list(INTERPOLATE_FIELDS),
        )
    return GenerateRequest(
        request.prompt, 1, seed, request.options, interpolate=Interpolation(prompt_b, seed_b, frames)
    )


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

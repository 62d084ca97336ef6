"""The MLflow pyfunc of a registered aigc model: a ``prompt`` column in, base64 PNG strings out.

``predict``'s params (declared in the logged signature: :func:`param_specs`) are ``num_samples``,
``seed`` (-1: random), the family's options, and the edits of families that support them
(``GenerativeModule.edit_modes``):

- ``init_image``: a base64 PNG of the model's size (image-to-image; one image for every row),
  ``strength`` in [0, 1] (default 0.6; 1.0 with a mask);
- ``mask``: a base64 PNG of the model's size, white (grey >= 128) = regenerate (inpainting, with
  ``init_image``);
- ``prompt_b``, ``seed_b``, ``frames`` (any of them set: interpolation, from the one prompt row and
  ``seed`` (default 0) to ``prompt_b`` (default the same prompt) and ``seed_b`` (default ``seed``),
  ``frames`` images (default 8), returned in order).

All params are strings and numbers: nothing is pickled on the way in either.

Logged as "models from code" (``model_code.py`` beside this file holds the one ``set_model`` call):
MLflow records the file and ships the ``aigc`` package in ``code_paths``, so no Python object is
pickled and the model loads where aigc is not installed. The weights travel as the export folder
(``weights.safetensors`` + ``config.json`` + ``tokenizer.json``), the model's one artifact.

A process imports one ``aigc`` for its lifetime: MLflow only prepends the shipped ``code/`` folder
to ``sys.path``, so a process that already imported aigc (a Serve replica, a notebook) keeps its
own. The export's ``config.json`` records the aigc version that wrote it; a different version in
the loading process is logged as a warning, and the export format is checked on load.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow.pyfunc

from aigc.data.images import png_base64  # noqa: F401 - re-exported: the pyfunc's output encoding
from aigc.registry.versions import EXPORT_ARTIFACT  # the key of the export folder in its artifacts

log = logging.getLogger("aigc.registry")


def prompts_of(model_input: Any) -> list[str]:
    """The ``prompt`` column of a DataFrame, or a list of prompts / of ``{"prompt": ...}`` records."""
    if hasattr(model_input, "columns"):
        if "prompt" not in model_input.columns:
            raise ValueError(f"input needs a 'prompt' column; got {list(model_input.columns)}")
        values = model_input["prompt"].tolist()
    elif isinstance(model_input, dict) and "prompt" in model_input:
        values = model_input["prompt"]
        values = [values] if isinstance(values, str) else list(values)
    else:
        values = [r["prompt"] if isinstance(r, dict) else r for r in model_input]
    # A missing prompt (None, or NaN once pandas has seen it) is the unconditional prompt "".
    return ["" if v is None or (isinstance(v, float) and v != v) else str(v) for v in values]


def generate_params(params: dict[str, Any] | None, options: dict[str, type]) -> tuple[int, int | None, dict]:
    """(num_samples, seed, family options) from pyfunc params; seed < 0 or None means random, an
    option left None keeps the model's default."""
    params = dict(params or {})
    num_samples = int(params.pop("num_samples", 1) or 1)
    seed = params.pop("seed", None)
    seed = None if seed is None or int(seed) < 0 else int(seed)
    family = {k: options[k](v) for k, v in params.items() if k in options and v is not None}
    return num_samples, seed, family


#: The edit params of ``predict`` as (name, MLflow type): each defaults to None (not given).
EDIT_PARAMS: tuple[tuple[str, str], ...] = (
    ("init_image", "string"),
    ("mask", "string"),
    ("strength", "double"),
    ("prompt_b", "string"),
    ("seed_b", "long"),
    ("frames", "long"),
)
#: ``frames`` when an interpolation gives none (GenerativeModule.interpolate's default)
DEFAULT_FRAMES = 8
#: The largest base64-decoded image the pyfunc accepts, in bytes (serving has its own limit).
MAX_IMAGE_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class EditParams:
    """The edit params of one ``predict`` call, decoded: uint8 ``(C, H, W)`` / bool ``(1, H, W)``
    numpy arrays for the images; ``frames`` is None unless it is an interpolation."""

    init_image: Any = None
    mask: Any = None
    strength: float | None = None
    prompt_b: str | None = None
    seed_b: int | None = None
    frames: int | None = None

    @property
    def interpolation(self) -> bool:
        return self.frames is not None


def edit_params(params: dict[str, Any] | None, size: int, channels: int) -> EditParams:
    """The edit params (:data:`EDIT_PARAMS`) of pyfunc ``params`` for a model making ``channels``
    x ``size`` x ``size`` images, checked: a ValueError names the param and what it needs."""
    from aigc.data.images import decode_base64_image, image_pixels, mask_pixels, open_image

    p = {k: v for k, v in (params or {}).items() if k in dict(EDIT_PARAMS) and v is not None}
    p = {k: v for k, v in p.items() if not (isinstance(v, float) and v != v)}  # NaN: not given

    def image(name: str):
        data = decode_base64_image(p[name], what=name, max_bytes=MAX_IMAGE_BYTES)
        return open_image(data, what=name, size=size)

    init = image_pixels(image("init_image"), channels) if "init_image" in p else None
    mask = mask_pixels(image("mask")) if "mask" in p else None
    strength = None if "strength" not in p else float(p["strength"])
    if any(k in p for k in ("prompt_b", "seed_b", "frames")):
        if init is not None or mask is not None or strength is not None:
            raise ValueError("interpolation (prompt_b, seed_b, frames) takes no init_image, mask or strength")
        frames = int(p.get("frames", DEFAULT_FRAMES))
        seed_b = None if "seed_b" not in p or int(p["seed_b"]) < 0 else int(p["seed_b"])
        return EditParams(prompt_b=p.get("prompt_b"), seed_b=seed_b, frames=frames)
    return EditParams(init, mask, strength)


def param_specs(module: Any) -> list:
    """The MLflow ``ParamSpec`` of every ``predict`` param, defaulting to the model's config:
    ``num_samples``, ``seed`` (-1: random), each family option, and :data:`EDIT_PARAMS` (declared
    for every family, so a family without edits answers with what it supports rather than
    MLflow dropping the param)."""
    from mlflow.types.schema import ParamSpec

    specs = [ParamSpec("num_samples", "long", 1), ParamSpec("seed", "long", -1)]
    defaults = module.option_defaults()
    for option, kind in module.generate_options.items():
        specs.append(ParamSpec(option, _PYTHON_TYPES[kind], defaults.get(option)))
    specs += [ParamSpec(name, kind, None) for name, kind in EDIT_PARAMS]
    return specs


_PYTHON_TYPES = {int: "long", float: "double", str: "string", bool: "boolean"}


class GenModel(mlflow.pyfunc.PythonModel):
    """Loads the export folder; ``predict`` returns ``len(prompts) * num_samples`` PNGs, grouped by
    prompt, as base64 strings (an interpolation: ``frames`` PNGs, in order)."""

    def load_context(self, context: Any) -> None:
        from aigc import __version__
        from aigc.models.export import load_export

        path = Path(context.artifacts[EXPORT_ARTIFACT])
        written_by = json.loads((path / "config.json").read_text(encoding="utf-8")).get("aigc_version")
        if written_by != __version__:
            log.warning("export written by aigc %s, loaded by aigc %s", written_by, __version__)
        if json.loads((path / "config.json").read_text(encoding="utf-8")).get("base"):
            # A LoRA adapter: its base version comes from the registry MLFLOW_TRACKING_URI names.
            from aigc.registry.versions import client_for, load_export_folder

            self.module = load_export_folder(client_for(None), path)
        else:
            self.module = load_export(path)

    # No type hints on predict: MLflow would read them as a schema; the signature is logged explicitly.
    def predict(self, context, model_input, params=None):
        import torch

        module = self.module
        num_samples, seed, options = generate_params(params, module.generate_options)
        prompts = prompts_of(model_input)
        edit = edit_params(params, module.image_size, module.channels)
        if edit.interpolation:
            if len(prompts) != 1 or num_samples != 1:
                raise ValueError(
                    f"interpolation takes one prompt row (prompt_a) and num_samples 1; got "
                    f"{len(prompts)} row(s), num_samples {num_samples}"
                )
            images = module.interpolate(
                prompts[0], edit.prompt_b, edit.frames, 0 if seed is None else seed, edit.seed_b, **options
            )
        else:
            images = module.generate(
                prompts,
                num_samples=num_samples,
                seed=seed,
                init_images=None if edit.init_image is None else torch.from_numpy(edit.init_image),
                masks=None if edit.mask is None else torch.from_numpy(edit.mask),
                strength=edit.strength,
                **options,
            )
        return [png_base64(img) for img in images.numpy()]

"""The MLflow pyfunc of a registered aigc model: a ``prompt`` column in, base64 PNG strings out.

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

import base64
import io
import json
import logging
from pathlib import Path
from typing import Any

import mlflow.pyfunc

from aigc.registry.versions import EXPORT_ARTIFACT  # the key of the export folder in its artifacts

log = logging.getLogger("aigc.registry")


def png_base64(image: Any) -> str:
    """uint8 ``(C, H, W)`` (torch or numpy) -> a base64 PNG string."""
    import numpy as np
    from PIL import Image

    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3:
        raise ValueError(f"expected uint8 (C, H, W), got {arr.dtype} {arr.shape}")
    arr = arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


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


class GenModel(mlflow.pyfunc.PythonModel):
    """Loads the export folder; ``predict`` returns ``len(prompts) * num_samples`` PNGs, grouped by
    prompt, as base64 strings."""

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
        num_samples, seed, options = generate_params(params, self.module.generate_options)
        images = self.module.generate(prompts_of(model_input), num_samples=num_samples, seed=seed, **options)
        return [png_base64(img) for img in images.numpy()]

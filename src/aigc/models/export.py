"""Exports: what leaves training for the registry and serving (``docs/architecture.md``, Contracts).

An export folder holds ``weights.safetensors`` (no pickle), ``config.json`` (family, resolved model
config, image size, channels, and for a latent model its ``latent`` section) and
``tokenizer.json``. Training checkpoints are Lightning files that only the platform that wrote them
trusts; they load with ``weights_only=True``. A latent dataset carries the export of the autoencoder
that encoded it (:mod:`aigc.data.latents`); :func:`load_dataset_autoencoder` loads it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from aigc import __version__
from aigc.contract import EXPORT_FILES, INIT_DIR, INIT_SOURCE_FILE
from aigc.data.latents import autoencoder_location, latent_spec
from aigc.data.manifest import DatasetError, manifest_location, read_manifest, sha256_file
from aigc.models import module_class
from aigc.models.base import GenerativeModule
from aigc.models.text import Tokenizer

EXPORT_FORMAT = "aigc-export/1"


def export_model(module: GenerativeModule, out_dir: str | Path, base: dict[str, Any] | None = None) -> Path:
    """Write ``module`` as an export folder; returns the folder. A LoRA model's export holds its
    adapters only and names its base model, ``base`` (``{"model", "version", "run_id", "ref"}``: a
    registered version, which :func:`aigc.registry.versions.load_version` loads it onto)."""
    base = base or getattr(module, "base_ref", None)  # what the module was loaded onto, if known
    if module.needs_base and not base:
        raise ValueError(
            f"this {module.family} model is a LoRA adapter: its export holds the adapter only and must "
            "name its base model (base={'model': ..., 'version': ...})"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # A module on a pretrained base leaves the frozen base weights out: the sd family's constructor
    # rebuilds them from its pipeline folder, a LoRA model loads onto the base its config names.
    frozen = module.base_weight_keys()
    # clone(): safetensors refuses tensors that share storage (tied weights, views).
    state = {
        k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items() if k not in frozen
    }
    save_file(state, str(out / "weights.safetensors"), metadata={"format": EXPORT_FORMAT})
    config = {
        "format": EXPORT_FORMAT,
        "aigc_version": __version__,
        "family": module.family,
        "model": module.model_cfg.model_dump(mode="json"),
        "image_size": module.image_size,
        "channels": module.channels,
        # A latent model's dataset section (shape, scale, autoencoder config and lineage); its
        # autoencoder's weights are in weights.safetensors with the rest (``autoencoder.*``).
        "latent": module.latent,
    }
    if module.needs_base:
        config["base"] = dict(base or {})
    (out / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    module.tokenizer.save(out / "tokenizer.json")
    return out


def load_export(
    path: str | Path, map_location: str | torch.device = "cpu", base: str | Path | None = None
) -> GenerativeModule:
    """Load an export folder written by :func:`export_model`, in eval mode. A LoRA adapter's export
    loads onto ``base``, the export folder (path or URL) of the base model its config names."""
    path = Path(path)
    for name in EXPORT_FILES:
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path} is not an aigc export: {name} is missing")
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    if config.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{path}/config.json: format {config.get('format')!r}, expected {EXPORT_FORMAT!r}")
    cls = module_class(config["family"])
    module = cls(
        model=config["model"],
        tokenizer=Tokenizer.load(path / "tokenizer.json").to_dict(),
        image_size=config["image_size"],
        channels=config["channels"],
        latent=config.get("latent"),
    )
    if module.needs_base:
        if base is None:
            raise ValueError(
                f"{path} is a LoRA adapter on {config.get('base')}: load it onto its base model "
                "(aigc.registry.versions.load_version does, for a registered version)"
            )
        from aigc.models.init import load_init

        load_init(module, base)
        module.base_ref = config.get("base")
    module.load_state_dict(load_file(str(path / "weights.safetensors"), device=str(map_location)))
    return module.to(map_location).eval()


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", base: str | Path | None = None
) -> GenerativeModule:
    """Load a Lightning checkpoint written by aigc training (``weights_only=True``). A LoRA model's
    checkpoint holds its adapters only and loads onto ``base``, by default its run folder's
    ``init-from/`` (``<run>/checkpoint-stepN/checkpoint.ckpt`` -> ``<run>/init-from``)."""
    ckpt = torch.load(str(path), map_location=map_location, weights_only=True)
    hp = ckpt.get("hyper_parameters")
    if not hp or "model" not in hp or "family" not in hp["model"]:
        raise ValueError(f"{path}: not an aigc checkpoint (no model hyperparameters)")
    cls = module_class(hp["model"]["family"])
    module = cls(**hp)
    if module.needs_base:
        from aigc.models.init import load_init

        base = base if base is not None else Path(path).parent.parent / INIT_DIR
        if "://" not in str(base) and not Path(base).is_dir():
            raise FileNotFoundError(f"{path} is a LoRA checkpoint, and its base model {base} is missing")
        load_init(module, base)
        module.base_ref = read_base_ref(base)
    module.load_state_dict(ckpt["state_dict"])
    return module.to(map_location).eval()


def read_base_ref(location: str | Path) -> dict[str, Any] | None:
    """What the export folder a run started from is (``init-from/source.json``: the registered model
    and version, the run, the reference given), for the export of a LoRA model trained on it."""
    import fsspec

    try:
        with fsspec.open(f"{location}/{INIT_SOURCE_FILE}", "r", encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def load_model(
    path: str | Path, map_location: str | torch.device = "cpu", base: str | Path | None = None
) -> GenerativeModule:
    """An export folder or a ``.ckpt`` file, whichever ``path`` is (``base``: a LoRA model's base)."""
    p = Path(path)
    return load_export(p, map_location, base) if p.is_dir() else load_checkpoint(p, map_location, base)


def load_dataset_autoencoder(
    location: str | os.PathLike[str], manifest: dict[str, Any] | None = None
) -> GenerativeModule:
    """The autoencoder module a latent dataset carries (its ``autoencoder/`` export, at a local
    path or fsspec URL), checked against the sha256 its manifest records. ``manifest``, if given,
    is the dataset's, already read. Raises :class:`~aigc.data.manifest.DatasetError` for a dataset
    that is not a latent one, and for an export that is missing or differs from the manifest."""
    import fsspec

    loc = os.fspath(location)
    manifest = manifest or read_manifest(loc)
    spec = latent_spec(manifest)
    if spec is None:
        raise DatasetError(f"{manifest_location(loc)}: not a latent dataset (no latent section)")
    where = autoencoder_location(loc)
    with tempfile.TemporaryDirectory(prefix="aigc-autoencoder-") as tmp:
        for file in EXPORT_FILES:
            try:
                with fsspec.open(f"{where}/{file}", "rb") as f_in, open(Path(tmp) / file, "wb") as f_out:
                    shutil.copyfileobj(f_in, f_out)
            except FileNotFoundError:
                raise DatasetError(
                    f"{where}/{file}: missing; re-encode the dataset (aigc data encode)"
                ) from None
        digest = sha256_file(Path(tmp) / "weights.safetensors")
        if digest != spec.get("autoencoder_sha256"):
            raise DatasetError(
                f"{where}/weights.safetensors: sha256 {digest[:12]} differs from the manifest's "
                f"{str(spec.get('autoencoder_sha256'))[:12]}; re-encode the dataset (aigc data encode)"
            )
        return load_export(tmp)

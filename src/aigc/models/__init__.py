"""The model zoo: one LightningModule per family behind one ``generate`` contract.

Family modules import torch and Lightning; they are imported lazily so that ``aigc`` commands
that only validate configs or build data stay fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from aigc.config import FAMILIES, RunConfig

if TYPE_CHECKING:
    from aigc.models.base import GenerativeModule
    from aigc.models.text import Tokenizer


def module_class(family: str) -> type[GenerativeModule]:
    """The LightningModule class of ``family``.

    By convention (no second list of families): the :class:`GenerativeModule` subclass in
    ``aigc.models.<family>`` whose ``family`` is ``family``.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; allowed: {', '.join(FAMILIES)}")
    from aigc.models.base import GenerativeModule

    module = importlib.import_module(f"{__name__}.{family}")
    for obj in vars(module).values():
        if (
            isinstance(obj, type)
            and issubclass(obj, GenerativeModule)
            and getattr(obj, "family", None) == family
        ):
            return obj
    raise ImportError(f"{module.__name__} defines no GenerativeModule subclass with family = {family!r}")


def build_module(
    cfg: RunConfig,
    tokenizer: Tokenizer,
    image_size: int,
    channels: int,
    latent: dict[str, Any] | None = None,
) -> GenerativeModule:
    """A fresh family module for a run config; hyperparameters are stored as plain JSON.

    ``latent`` is the ``latent`` section of a latent dataset's manifest (:mod:`aigc.data.latents`):
    the module then learns on those latents and carries the autoencoder (weights still to be loaded,
    see ``GenerativeModule.load_autoencoder``); ``image_size``/``channels`` stay the pixel images'.
    """
    model: dict[str, Any] = cfg.model.model_dump(mode="json")
    return module_class(cfg.model.family)(
        model=model,
        tokenizer=tokenizer.to_dict(),
        image_size=image_size,
        channels=channels,
        trainer=cfg.trainer.model_dump(mode="json"),
        latent=latent,
    )


def build_module_for_dataset(
    cfg: RunConfig, location: str, tokenizer: Tokenizer | None = None
) -> GenerativeModule:
    """:func:`build_module` for the dataset at ``location`` (a folder or URL), outside ``aigc train``
    (quality tests, benchmarks): its manifest's image size and channels, a tokenizer built from its
    train captions unless given, and for a latent dataset its ``latent`` section and the weights of
    the autoencoder it carries."""
    from aigc.data.captions_io import read_captions
    from aigc.data.manifest import read_manifest
    from aigc.models.export import load_dataset_autoencoder
    from aigc.models.text import Tokenizer

    manifest = read_manifest(location)
    if tokenizer is None:
        tokenizer = Tokenizer.build(read_captions(location, "train"))
    module = build_module(
        cfg, tokenizer, manifest["image_size"], manifest["channels"], manifest.get("latent")
    )
    if module.carries_autoencoder:
        module.load_autoencoder(load_dataset_autoencoder(location, manifest))
    elif module.latent is not None:  # sd latents: the pipeline's VAE must be the one that encoded them
        from aigc.models.sd import check_dataset_vae

        check_dataset_vae(cfg.model.pipeline, location, manifest)
    return module

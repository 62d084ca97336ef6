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

_CLASSES = {
    "diffusion": ("aigc.models.diffusion", "DiffusionModule"),
    "gan": ("aigc.models.gan", "GANModule"),
    "vae": ("aigc.models.vae", "VAEModule"),
    "autoregressive": ("aigc.models.autoregressive", "AutoregressiveModule"),
}


def module_class(family: str) -> type[GenerativeModule]:
    """The LightningModule class of ``family``."""
    if family not in _CLASSES:
        raise ValueError(f"unknown family {family!r}; allowed: {', '.join(FAMILIES)}")
    mod, name = _CLASSES[family]
    return getattr(importlib.import_module(mod), name)


def build_module(cfg: RunConfig, tokenizer: Tokenizer, image_size: int, channels: int) -> GenerativeModule:
    """A fresh family module for a run config; hyperparameters are stored as plain JSON."""
    model: dict[str, Any] = cfg.model.model_dump(mode="json")
    return module_class(cfg.model.family)(
        model=model,
        tokenizer=tokenizer.to_dict(),
        image_size=image_size,
        channels=channels,
        trainer=cfg.trainer.model_dump(mode="json"),
    )

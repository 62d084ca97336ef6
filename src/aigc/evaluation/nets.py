"""The evaluator's networks: a CLIP-style image-text dual encoder and a small image classifier.

Both image networks share one trunk design that works for any size from 8x8 to 256x256: a 3x3
stem, then stride-2 stages until the map is at most 4x4, then a flatten and an MLP. The dual
encoder (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision") maps images and captions into one embedding space; its image *features*
(LayerNorm'd, ``feature_dim``) are what FD and diversity are measured on, its normalised
*embeddings* (``embed_dim``) what CLIP score is measured on.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from aigc.models.text import TextEncoder, TextEncoderConfig


@dataclass
class EvaluatorConfig:
    """Architecture and training of a reference evaluator (plain JSON; hashed with the weights)."""

    image_size: int = 8
    channels: int = 1
    num_classes: int = 0  # 0: the dataset has no labels, no classifier
    width: int = 16  # channels of the first stage; doubled per stage, capped at 8 * width
    feature_dim: int = 64  # FD / diversity features: small so 500 samples estimate a covariance
    embed_dim: int = 64  # joint image-text space for CLIP score
    text_dim: int = 64
    text_layers: int = 2
    text_heads: int = 4
    max_tokens: int = 16
    clip_steps: int = 400
    classifier_steps: int = 300
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 1e-4
    max_shift: int = 1  # random-translation augmentation, pixels (images >= 32 px: scaled by size/8)
    max_train_images: int = 50_000
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvaluatorConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown evaluator config key(s) {unknown}; allowed: {sorted(known)}")
        return cls(**data)


class ImageTrunk(nn.Module):
    """uint8-free image trunk: float ``(B, C, H, W)`` in [-1, 1] -> ``(B, out_dim)``."""

    def __init__(self, channels: int, image_size: int, width: int, out_dim: int):
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(channels, width, 3, padding=1),
            nn.GroupNorm(8, width),
            nn.SiLU(),
        ]
        c, size = width, image_size
        while size > 4:
            c_out = min(2 * c, 8 * width)
            layers += [
                nn.Conv2d(c, c_out, 3, stride=2, padding=1),
                nn.GroupNorm(8, c_out),
                nn.SiLU(),
                nn.Conv2d(c_out, c_out, 3, padding=1),
                nn.GroupNorm(8, c_out),
                nn.SiLU(),
            ]
            c, size = c_out, math.ceil(size / 2)
        self.convs = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(c * size * size, 4 * out_dim), nn.SiLU(), nn.Linear(4 * out_dim, out_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.convs(x))  # (B, out_dim)


class DualEncoder(nn.Module):
    """Image and text towers meeting in a normalised ``embed_dim`` space with a learned temperature."""

    def __init__(self, cfg: EvaluatorConfig, vocab_size: int):
        super().__init__()
        self.image_trunk = ImageTrunk(cfg.channels, cfg.image_size, cfg.width, cfg.feature_dim)
        self.image_norm = nn.LayerNorm(cfg.feature_dim)
        self.image_proj = nn.Linear(cfg.feature_dim, cfg.embed_dim)
        self.text = TextEncoder(
            TextEncoderConfig(
                vocab_size,
                dim=cfg.text_dim,
                layers=cfg.text_layers,
                heads=cfg.text_heads,
                max_tokens=cfg.max_tokens,
            )
        )
        self.text_proj = nn.Linear(cfg.text_dim, cfg.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature

    def image_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` in [-1, 1] -> FD features ``(B, feature_dim)``."""
        return self.image_norm(self.image_trunk(x))

    def image_embeddings(self, features: torch.Tensor) -> torch.Tensor:
        """Features -> unit-norm embeddings ``(B, embed_dim)``."""
        return F.normalize(self.image_proj(features), dim=-1)

    def text_embeddings(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Token ids ``(B, T)`` -> unit-norm embeddings ``(B, embed_dim)``."""
        _, pooled = self.text(ids, mask)
        return F.normalize(self.text_proj(pooled), dim=-1)


class ImageClassifier(nn.Module):
    """A small CNN: ``(B, C, H, W)`` in [-1, 1] -> logits ``(B, num_classes)``."""

    def __init__(self, cfg: EvaluatorConfig):
        super().__init__()
        self.net = ImageTrunk(cfg.channels, cfg.image_size, cfg.width, cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def clip_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, captions: list[str]) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of unit embeddings ``(B, E)``.

    Pairs whose captions are the same string are all positives (soft targets spread evenly over
    them): with template captions ("a handwritten digit seven") a batch holds many exact
    duplicates, and treating them as negatives would ask the model for the impossible.
    """
    logits = scale.exp().clamp(max=100.0) * img @ txt.t()  # (B, B)
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    cap = torch.tensor([ids[c] for c in captions], device=img.device)
    same = (cap[:, None] == cap[None, :]).float()  # (B, B), symmetric
    targets = same / same.sum(1, keepdim=True)
    loss_i = -(targets * F.log_softmax(logits, dim=1)).sum(1).mean()
    loss_t = -(targets * F.log_softmax(logits.t(), dim=1)).sum(1).mean()
    return 0.5 * (loss_i + loss_t)

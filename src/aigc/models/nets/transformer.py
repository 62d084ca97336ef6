"""A decoder-only transformer (GPT) with an optional projected prefix and a KV cache.

nanoGPT-style: token + learned position embeddings, ``n_layer`` pre-norm blocks of causal
multi-head self-attention (scaled dot-product attention, Vaswani et al. 2017, "Attention Is All
You Need") and an MLP, a final LayerNorm and a linear head.

Two additions for conditional image generation:

* a *prefix*: per-token features ``(B, P, prefix_dim)`` (e.g. a text encoder's output) projected
  to ``n_embd`` and placed before the token sequence, with a mask of its real positions. Padded
  prefix positions are never attended to (except by themselves, so no attention row is empty).
* a *KV cache*: every layer's past keys and values plus the key mask, so that sampling feeds one
  new token per step instead of re-running the whole sequence. Cached decoding gives the same
  logits as the full forward pass (tests/unit/test_autoregressive.py checks it). The first cached
  step moves the keys and values into buffers of ``block_size`` positions, and every later step
  writes its position in place: concatenating instead copied the whole cache at every step, which
  at 32x32 RGB (3088 positions) was 70 % of a late sampling step's time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class GPTConfig:
    vocab_size: int  # input token ids 0..vocab_size-1 (e.g. pixel levels + a start token)
    block_size: int  # longest sequence, prefix included
    out_size: int | None = None  # logits per position; default vocab_size
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    prefix_dim: int | None = None  # feature size of the prefix; None: no prefix


@dataclass
class KVCache:
    """Past keys/values of every layer and the key mask ``(B, T_past)``.

    Each layer's keys and values are ``(B, nh, capacity, hs)`` buffers of which the first
    ``length`` positions are filled (``capacity`` is ``T_past`` after a full forward pass and
    ``block_size`` once decoding has started). GPT.forward extends the buffers in place, so a cache
    passed to it is consumed: continue from the cache it returns, never decode twice from one cache.
    """

    layers: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    key_mask: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.key_mask is None else self.key_mask.shape[1]


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        if cfg.n_embd % cfg.n_head != 0:
            raise ValueError(f"n_embd={cfg.n_embd} is not divisible by n_head={cfg.n_head}")
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.block_size = cfg.block_size
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None,
        past: tuple[torch.Tensor, torch.Tensor] | None,
        past_len: int = 0,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """x (B, T, C); attn_mask (B, 1, T, T_past + T) bool or None for plain causal; ``past``: the
        layer's key/value buffers (see :class:`KVCache`) holding ``past_len`` positions."""
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        # (B, T, C) -> (B, nh, T, hs)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        present = (k, v)
        if past is not None:
            end = past_len + t
            kb, vb = past
            if kb.shape[2] < end:  # the first cached step: buffers for the whole block, filled once
                kb, vb = (self._buffer(z, past_len) for z in past)
            kb[:, :, past_len:end] = k  # in place: no copy of the past per step
            vb[:, :, past_len:end] = v
            present = (kb, vb)
            k, v = kb[:, :, :end], vb[:, :, :end]  # (B, nh, T_past + T, hs) views
        drop = self.dropout if self.training else 0.0
        if attn_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=drop)
        y = y.transpose(1, 2).contiguous().view(b, t, c)  # (B, T, C)
        return self.resid_drop(self.proj(y)), present

    def _buffer(self, past: torch.Tensor, past_len: int) -> torch.Tensor:
        """A ``(B, nh, block_size, hs)`` buffer whose first ``past_len`` positions are ``past``'s."""
        b, nh, _, hs = past.shape
        buf = past.new_empty(b, nh, self.block_size, hs)
        buf[:, :, :past_len] = past[:, :, :past_len]
        return buf


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-norm: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x, attn_mask, past, past_len=0):
        a, present = self.attn(self.ln_1(x), attn_mask, past, past_len)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, present


class GPT(nn.Module):
    """forward(idx (B, T), prefix, prefix_mask, cache) -> (logits (B, P + T, out_size), new cache)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.prefix_proj = nn.Linear(cfg.prefix_dim, cfg.n_embd) if cfg.prefix_dim else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.out_size or cfg.vocab_size, bias=False)
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer) so depth does not blow up
        # the residual stream at initialisation.
        for name, p in self.named_parameters():
            if name.endswith("proj.weight") and "prefix" not in name:
                nn.init.normal_(p, mean=0.0, std=0.02 / (2 * cfg.n_layer) ** 0.5)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def forward(
        self,
        idx: torch.Tensor,
        prefix: torch.Tensor | None = None,
        prefix_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> tuple[torch.Tensor, KVCache]:
        """Run ``prefix`` (B, P, prefix_dim) then ``idx`` (B, T) after ``cache``'s positions.

        Returns logits for every new position (prefix positions included) and the extended cache.
        """
        past_len = cache.length if cache is not None else 0
        parts = []
        if prefix is not None:
            if self.prefix_proj is None:
                raise ValueError("this GPT was built without prefix_dim; it takes no prefix")
            parts.append(self.prefix_proj(prefix))  # (B, P, C)
        parts.append(self.wte(idx))  # (B, T, C)
        x = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        b, t, _ = x.shape
        if past_len + t > self.cfg.block_size:
            raise ValueError(f"sequence of {past_len + t} positions > block_size={self.cfg.block_size}")
        pos = torch.arange(past_len, past_len + t, device=x.device)
        x = self.drop(x + self.wpe(pos))  # (B, T_new, C)

        # Key mask over every position so far: prefix_mask for the prefix, True for tokens.
        new_mask = torch.ones(b, t, dtype=torch.bool, device=x.device)
        if prefix is not None and prefix_mask is not None:
            new_mask[:, : prefix.shape[1]] = prefix_mask.to(device=x.device, dtype=torch.bool)
        key_mask = (
            new_mask
            if cache is None or cache.key_mask is None
            else torch.cat([cache.key_mask, new_mask], dim=1)
        )  # (B, T_past + T_new)
        attn_mask = self._attn_mask(key_mask, past_len, t)

        presents = []
        for i, block in enumerate(self.blocks):
            past = cache.layers[i] if cache is not None and cache.layers else None
            x, present = block(x, attn_mask, past, past_len)
            presents.append(present)
        logits = self.head(self.ln_f(x))  # (B, T_new, out_size)
        return logits, KVCache(presents, key_mask)

    @staticmethod
    def _attn_mask(key_mask: torch.Tensor, past_len: int, t: int) -> torch.Tensor | None:
        """(B, 1, T, T_past + T) bool: causal, no padded keys, and each position sees itself.

        None (plain ``is_causal``) when there is no cache and no padding: the fast path.
        """
        if past_len == 0 and bool(key_mask.all()):
            return None
        if t == 1:  # one new token after the cache: causality holds already, only padding matters
            return key_mask.view(key_mask.shape[0], 1, 1, -1)
        total = key_mask.shape[1]
        q_pos = torch.arange(past_len, past_len + t, device=key_mask.device).view(t, 1)
        k_pos = torch.arange(total, device=key_mask.device).view(1, total)
        causal = k_pos <= q_pos  # (T, T_total)
        allowed = (causal.unsqueeze(0) & key_mask.unsqueeze(1)) | (k_pos == q_pos).unsqueeze(0)
        return allowed.unsqueeze(1)  # (B, 1, T, T_total)

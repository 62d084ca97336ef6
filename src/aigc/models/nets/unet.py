"""A small text-conditioned UNet for diffusion: a pure ``nn.Module`` built from :class:`UNetConfig`.

Shape of the network (Ho et al. 2020's UNet, with Stable-Diffusion-style text conditioning)::

    x (B, C, H, W) ─conv_in─► down levels ─► middle ─► up levels (+ skips) ─conv_out─► (B, C, H, W)
    t (B,) ─sinusoidal─MLP─► emb (B, E) ─► scale/shift in every residual block

Each level holds ``num_res_blocks`` residual blocks (GroupNorm, SiLU, 3×3 convs, the embedding
applied as a FiLM scale/shift); the resolution halves between levels. Text enters either

- ``cross_attn``: after every residual block of the levels at most 16×16 (see below) a
  cross-attention layer whose queries are the pixels and whose keys/values are the text tokens
  ``(B, T, D)`` (padding masked out), as in Stable Diffusion; the pooled text feature is also added
  to the time embedding (as SDXL does), or
- ``film``: only the pooled text feature ``(B, D)``, added to the time embedding, so every block
  is modulated by it (FiLM, Perez et al. 2018).

**Levels.** ``channel_mults`` asks for ``len(channel_mults)`` levels, but a level only exists if
the resolution can be halved exactly and stays at least 2×2: at 8×8 at most 3 levels (8, 4, 2),
at 32×32 at most 5. Extra entries of ``channel_mults`` are ignored; :func:`num_levels` says how
many are used.

**Attention only where it pays.** The middle block has self-attention when its resolution is at
most 16×16 (beyond, attention over every pixel costs more than it helps at these sizes), and the
levels cross-attend to the text only where their resolution is at most 16×16 too: a caption says
what is in the image, which the low-resolution levels decide; the high-resolution levels refine
edges and texture and still read the pooled text through every block's FiLM scale/shift. At 32×32
and 64×64 this drops the cross-attention over 1024 / 4096 pixels (and the activations backward keeps
for it); at 8×8 every level is below the bound, so digits models are built exactly as before.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["UNetConfig", "UNet", "num_levels", "timestep_embedding"]

#: largest resolution (side in pixels) of the middle block's self-attention
MAX_SELF_ATTN_RES = 16
#: largest resolution of a level that cross-attends to the text tokens (``conditioning: cross_attn``)
MAX_CROSS_ATTN_RES = 16


@dataclass
class UNetConfig:
    in_channels: int = 1
    image_size: int = 8
    base_channels: int = 64
    channel_mults: tuple[int, ...] = field(default=(1, 2))
    num_res_blocks: int = 1
    text_dim: int = 128
    conditioning: Literal["cross_attn", "film"] = "cross_attn"
    heads: int = 4
    dropout: float = 0.0


def num_levels(image_size: int, requested: int) -> int:
    """How many resolution levels a UNet uses: halve while exact and the result is >= 2×2."""
    levels, res = 1, image_size
    while levels < requested and res % 2 == 0 and res // 2 >= 2:
        res //= 2
        levels += 1
    return levels


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Transformer-style sinusoidal embedding of integer timesteps ``t (B,)`` -> ``(B, dim)``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, ch), ch)


class ResBlock(nn.Module):
    """GN-SiLU-conv, FiLM from the embedding ``(B, E)``, GN-SiLU-dropout-conv, plus a skip."""

    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity: stable early training
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, Cout, H, W)
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head attention from pixels ``(B, C, H, W)`` to a context ``(B, T, D)`` (or to themselves)."""

    def __init__(self, ch: int, context_dim: int | None, heads: int):
        super().__init__()
        self.heads = heads if ch % heads == 0 else 1
        self.norm = _norm(ch)
        self.q = nn.Linear(ch, ch)
        self.kv = nn.Linear(context_dim or ch, 2 * ch)
        self.out = nn.Linear(ch, ch)
        nn.init.zeros_(self.out.weight)  # starts as the identity (residual)
        nn.init.zeros_(self.out.bias)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        b, c, h, w = x.shape
        q_in = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        ctx = q_in if context is None else context  # (B, T, D)
        k, v = self.kv(ctx).chunk(2, dim=-1)  # (B, T, C) each

        def heads(z: torch.Tensor) -> torch.Tensor:  # (B, N, C) -> (B, heads, N, C/heads)
            return z.reshape(b, z.shape[1], self.heads, c // self.heads).transpose(1, 2)

        attn_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, T), True = attend
        o = F.scaled_dot_product_attention(heads(self.q(q_in)), heads(k), heads(v), attn_mask=attn_mask)
        o = self.out(o.transpose(1, 2).reshape(b, h * w, c))  # (B, HW, C)
        return x + o.transpose(1, 2).reshape(b, c, h, w)


class Level(nn.Module):
    """``n`` residual blocks at one resolution ``res``, each followed by cross-attention when enabled
    (``conditioning: cross_attn`` and ``res <= MAX_CROSS_ATTN_RES``)."""

    def __init__(self, cin: int, cout: int, n: int, emb_dim: int, cfg: UNetConfig, res: int):
        super().__init__()
        self.res = nn.ModuleList(
            ResBlock(cin if i == 0 else cout, cout, emb_dim, cfg.dropout) for i in range(n)
        )
        cross = cfg.conditioning == "cross_attn" and res <= MAX_CROSS_ATTN_RES
        self.attn = (
            nn.ModuleList(Attention(cout, cfg.text_dim, cfg.heads) for _ in range(n)) if cross else None
        )

    def forward(
        self, h: torch.Tensor, emb: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        for i, block in enumerate(self.res):
            h = block(h, emb)
            if self.attn is not None:
                h = self.attn[i](h, tokens, mask)
        return h


class UNet(nn.Module):
    """forward(x (B, C, H, W), t (B,), tokens (B, T, D), mask (B, T), pooled (B, D)) -> (B, C, H, W)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        if cfg.conditioning not in ("cross_attn", "film"):
            raise ValueError(f"unknown conditioning {cfg.conditioning!r}; allowed: cross_attn, film")
        if not cfg.channel_mults:
            raise ValueError("channel_mults must not be empty")
        self.cfg = cfg
        self.levels = num_levels(cfg.image_size, len(cfg.channel_mults))
        chans = [cfg.base_channels * m for m in cfg.channel_mults[: self.levels]]
        emb_dim = 4 * cfg.base_channels
        self.time_mlp = nn.Sequential(
            nn.Linear(cfg.base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        self.text_proj = nn.Sequential(
            nn.Linear(cfg.text_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )

        self.conv_in = nn.Conv2d(cfg.in_channels, chans[0], 3, padding=1)
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        cin = chans[0]
        for i, ch in enumerate(chans):
            self.down.append(Level(cin, ch, cfg.num_res_blocks, emb_dim, cfg, cfg.image_size // 2**i))
            if i < self.levels - 1:
                self.downsample.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
            cin = ch

        mid = chans[-1]
        mid_res = cfg.image_size // 2 ** (self.levels - 1)
        self.mid1 = ResBlock(mid, mid, emb_dim, cfg.dropout)
        self.mid_self = Attention(mid, None, cfg.heads) if mid_res <= MAX_SELF_ATTN_RES else None
        self.mid_cross = Attention(mid, cfg.text_dim, cfg.heads) if cfg.conditioning == "cross_attn" else None
        self.mid2 = ResBlock(mid, mid, emb_dim, cfg.dropout)

        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i in reversed(range(self.levels)):
            ch = chans[i]
            self.up.append(Level(cin + ch, ch, cfg.num_res_blocks, emb_dim, cfg, cfg.image_size // 2**i))
            if i > 0:
                self.upsample.append(nn.Conv2d(ch, ch, 3, padding=1))
            cin = ch
        self.norm_out = _norm(chans[0])
        self.conv_out = nn.Conv2d(chans[0], cfg.in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        tokens: torch.Tensor,
        mask: torch.Tensor,
        pooled: torch.Tensor,
    ) -> torch.Tensor:
        if x.shape[1] != self.cfg.in_channels:
            raise ValueError(f"expected {self.cfg.in_channels} channels, got input of shape {tuple(x.shape)}")
        emb = self.time_mlp(timestep_embedding(t, self.cfg.base_channels).to(x.dtype))  # (B, E)
        emb = emb + self.text_proj(pooled)  # pooled text: FiLM through every block's scale/shift

        h = self.conv_in(x)  # (B, C0, H, W)
        skips = []
        for i, level in enumerate(self.down):
            h = level(h, emb, tokens, mask)
            skips.append(h)
            if i < self.levels - 1:
                h = self.downsample[i](h)  # (B, Ci, H/2, W/2)

        h = self.mid1(h, emb)
        if self.mid_self is not None:
            h = self.mid_self(h)
        if self.mid_cross is not None:
            h = self.mid_cross(h, tokens, mask)
        h = self.mid2(h, emb)

        for j, level in enumerate(self.up):
            skip = skips.pop()
            if j > 0:  # back to the skip's resolution, then a conv (no checkerboard from transposed convs)
                h = self.upsample[j - 1](F.interpolate(h, size=skip.shape[-2:], mode="nearest"))
            h = level(torch.cat([h, skip], dim=1), emb, tokens, mask)
        return self.conv_out(F.silu(self.norm_out(h)))

"""The conditional VAE's two nets (Kingma & Welling 2014; Sohn et al. 2015).

Both nets see the caption: the encoder q(z | x, c) concatenates a projection of the pooled caption
feature to its flattened convolutional features before the MLP head that outputs (mu, logvar);
the decoder p(x | z, c) concatenates it to z at its input and modulates every block with FiLM
from ``[z, c]`` (the generator's blocks, reused). Conditioning both sides lets the latent carry
only what the caption does not say (the style), so samples from the prior follow the prompt.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from aigc.models.nets.gan import GenBlock, group_count, num_resolutions


class VAEEncoder(nn.Module):
    """q(z | x, c): (x (B, C, H, W), text (B, D)) -> (mu (B, L), logvar (B, L))."""

    def __init__(
        self,
        latent_dim: int,
        text_dim: int,
        image_size: int,
        channels: int,
        base_channels: int,
        cond_dim: int = 64,
        hidden: int = 256,
    ):
        super().__init__()
        n_down, start = num_resolutions(image_size)
        self.image_size = image_size
        # Resize odd sizes to start * 2^n so the conv stack ends on a (start, start) map.
        self.work_size = start * 2**n_down
        widths = [base_channels * min(2**i, 4) for i in range(n_down + 1)]
        layers: list[nn.Module] = [nn.Conv2d(channels, widths[0], 3, padding=1)]
        for i in range(n_down):  # each: GroupNorm, SiLU, stride-2 conv halving the side
            layers += [
                nn.GroupNorm(group_count(widths[i]), widths[i]),
                nn.SiLU(),
                nn.Conv2d(widths[i], widths[i + 1], 3, stride=2, padding=1),
            ]
        layers += [nn.GroupNorm(group_count(widths[-1]), widths[-1]), nn.SiLU()]
        self.convs = nn.Sequential(*layers)
        self.text_proj = nn.Linear(text_dim, cond_dim)
        flat = widths[-1] * start * start
        self.head = nn.Sequential(
            nn.Linear(flat + cond_dim, hidden), nn.SiLU(), nn.Linear(hidden, 2 * latent_dim)
        )

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.shape[-1] != self.work_size:
            x = F.interpolate(x, size=(self.work_size, self.work_size), mode="bilinear", align_corners=False)
        h = self.convs(x).flatten(1)  # (B, C_last * s0 * s0)
        h = self.head(torch.cat([h, self.text_proj(text)], dim=1))  # (B, 2L)
        mu, logvar = h.chunk(2, dim=1)
        return mu, logvar.clamp(-12.0, 8.0)  # bounded so exp() stays finite under bf16 autocast


class VAEDecoder(nn.Module):
    """p(x | z, c): (z (B, L), text (B, D)) -> the Gaussian mean (B, C, H, W), unbounded."""

    def __init__(
        self,
        latent_dim: int,
        text_dim: int,
        image_size: int,
        channels: int,
        base_channels: int,
        cond_dim: int = 64,
    ):
        super().__init__()
        self.image_size = image_size
        n_up, self.start = num_resolutions(image_size)
        widths = [base_channels * min(2 ** (n_up - i), 4) for i in range(n_up + 1)]
        self.text_proj = nn.Linear(text_dim, cond_dim)
        zc = latent_dim + cond_dim
        self.fc = nn.Linear(zc, widths[0] * self.start * self.start)
        blocks = [GenBlock(widths[i], widths[i + 1], zc, upsample=True) for i in range(n_up)]
        self.blocks = nn.ModuleList(blocks or [GenBlock(widths[0], widths[0], zc, upsample=False)])
        self.out_norm = nn.GroupNorm(group_count(widths[-1]), widths[-1])
        self.out = nn.Conv2d(widths[-1], channels, 3, padding=1)

    def forward(self, z: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        zc = torch.cat([z, self.text_proj(text)], dim=1)  # (B, L + E)
        h = self.fc(zc).view(z.shape[0], -1, self.start, self.start)  # (B, C0, s0, s0)
        for block in self.blocks:
            h = block(h, zc)
        h = self.out(F.silu(self.out_norm(h)))
        if h.shape[-1] != self.image_size:
            size = (self.image_size, self.image_size)
            h = F.interpolate(h, size=size, mode="bilinear", align_corners=False)
        return h

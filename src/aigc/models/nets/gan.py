"""The GAN's two nets: a text-conditioned generator and a projection discriminator.

Generator (SNGAN/BigGAN-style ResNet, Miyato et al. 2018; Brock et al. 2019): the latent ``z``
(B, Z) and a condition vector from the pooled caption feature (B, E) are concatenated; a linear
layer maps them to a (C0, s0, s0) map that residual up-sampling blocks grow to the image size.
Every block normalises with GroupNorm and modulates with FiLM (Perez et al. 2018) from
``[z, cond]``: conditional normalisation without batch statistics, so a sample does not depend
on the rest of its batch and train and eval modes agree.

Discriminator: residual down-sampling blocks with spectral normalisation on every weight
(Miyato et al. 2018), ReLU, global sum pooling to features phi(x) (B, F), and the projection
output of Miyato & Koyama (2018): ``D(x, c) = w . phi(x) + <embed(c), phi(x)>`` where ``c`` is
the pooled caption feature. The inner product is what makes D judge *image-caption agreement*,
not only realism.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm


def num_resolutions(image_size: int) -> tuple[int, int]:
    """(number of 2x up/down-samplings, starting side) so that the start side is 4..7 pixels."""
    if image_size < 4:
        raise ValueError(f"image_size must be >= 4, got {image_size}")
    n = int(math.floor(math.log2(image_size / 4)))
    return n, math.ceil(image_size / 2**n)


def group_count(channels: int) -> int:
    """GroupNorm groups for ``channels``: up to 32, at least 2 channels per group where possible."""
    for g in (32, 16, 8, 4, 2, 1):
        if channels % g == 0 and channels // g >= 2:
            return g
    return 1


class FiLMNorm(nn.Module):
    """GroupNorm without affine parameters, then ``x * (1 + gamma(cond)) + beta(cond)``.

    The projection starts at zero so an untrained block is plain GroupNorm.
    """

    def __init__(self, channels: int, cond_dim: int):
        super().__init__()
        self.norm = nn.GroupNorm(group_count(channels), channels, affine=False)
        self.proj = nn.Linear(cond_dim, 2 * channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.proj(cond)[:, :, None, None].chunk(2, dim=1)  # (B, C, 1, 1) each
        return self.norm(x) * (1 + gamma) + beta


class GenBlock(nn.Module):
    """FiLM-norm, ReLU, (2x nearest up-sample), conv3x3, FiLM-norm, ReLU, conv3x3; 1x1 skip."""

    def __init__(self, c_in: int, c_out: int, cond_dim: int, upsample: bool):
        super().__init__()
        self.upsample = upsample
        self.n1 = FiLMNorm(c_in, cond_dim)
        self.c1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.n2 = FiLMNorm(c_out, cond_dim)
        self.c2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.n1(x, cond))
        if self.upsample:
            h = F.interpolate(h, scale_factor=2, mode="nearest")
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        h = self.c1(h)
        h = self.c2(F.relu(self.n2(h, cond)))
        return h + self.skip(x)


class Generator(nn.Module):
    """G(z (B, Z), text (B, D)) -> images (B, C, H, W) in [-1, 1]."""

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
        self.latent_dim, self.image_size = latent_dim, image_size
        n_up, self.start = num_resolutions(image_size)
        # Wider at low resolution, capped so 64x64 stays small: widths[i] at the i-th resolution.
        widths = [base_channels * min(2 ** (n_up - i), 4) for i in range(n_up + 1)]
        self.text_proj = nn.Linear(text_dim, cond_dim)
        zc = latent_dim + cond_dim  # FiLM input: [z, cond] (BigGAN's skip-z with a shared embedding)
        self.fc = nn.Linear(zc, widths[0] * self.start * self.start)
        # One residual block per 2x up-sampling (a single plain block when the image is 4..7 px).
        blocks = [GenBlock(widths[i], widths[i + 1], zc, upsample=True) for i in range(n_up)]
        blocks = blocks or [GenBlock(widths[0], widths[0], zc, upsample=False)]
        self.blocks = nn.ModuleList(blocks)
        self.out_norm = nn.GroupNorm(group_count(widths[-1]), widths[-1])
        self.out = nn.Conv2d(widths[-1], channels, 3, padding=1)

    def forward(self, z: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        zc = torch.cat([z, self.text_proj(text)], dim=1)  # (B, Z + E)
        h = self.fc(zc).view(z.shape[0], -1, self.start, self.start)  # (B, C0, s0, s0)
        for block in self.blocks:
            h = block(h, zc)
        h = self.out(F.relu(self.out_norm(h)))  # (B, C, s0 * 2^n, s0 * 2^n)
        if h.shape[-1] != self.image_size:  # sizes that are not 4..7 times a power of two
            h = F.interpolate(
                h, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False
            )
        return torch.tanh(h)


class DiscBlock(nn.Module):
    """(ReLU), SN-conv3x3, ReLU, SN-conv3x3, (2x2 average pool); SN-1x1 skip (SNGAN's D block)."""

    def __init__(self, c_in: int, c_out: int, downsample: bool, first: bool):
        super().__init__()
        self.downsample, self.first = downsample, first
        self.c1 = spectral_norm(nn.Conv2d(c_in, c_out, 3, padding=1))
        self.c2 = spectral_norm(nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = spectral_norm(nn.Conv2d(c_in, c_out, 1)) if (c_in != c_out or downsample) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x if self.first else F.relu(x)  # the first block sees pixels: no ReLU on them
        h = self.c2(F.relu(self.c1(h)))
        if self.downsample:
            h = F.avg_pool2d(h, 2)
        s = x
        if self.skip is not None:
            s = self.skip(s)
            if self.downsample:
                s = F.avg_pool2d(s, 2)
        return h + s


class ProjectionDiscriminator(nn.Module):
    """D(x (B, C, H, W), text (B, D)) -> logits (B,) with the projection term of Miyato & Koyama."""

    def __init__(self, text_dim: int, image_size: int, channels: int, base_channels: int):
        super().__init__()
        n_down, _ = num_resolutions(image_size)
        widths = [base_channels * min(2**i, 4) for i in range(n_down + 1)]
        blocks = [DiscBlock(channels, widths[0], downsample=n_down > 0, first=True)]
        blocks += [
            DiscBlock(widths[i], widths[i + 1], downsample=i + 1 < n_down, first=False) for i in range(n_down)
        ]
        self.blocks = nn.Sequential(*blocks)
        feat = widths[-1]
        self.linear = spectral_norm(nn.Linear(feat, 1))
        self.embed = spectral_norm(nn.Linear(text_dim, feat, bias=False))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """phi(x): (B, F) after global sum pooling."""
        return F.relu(self.blocks(x)).sum(dim=(2, 3))

    def score(self, phi: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Logits (B,) from features phi (B, F) and captions (B, D): reuse phi for several captions."""
        return self.linear(phi).squeeze(1) + (self.embed(text) * phi).sum(1)

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.score(self.features(x), text)  # (B,)

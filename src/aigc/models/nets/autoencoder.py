"""Image autoencoders for latent generative models: pure ``nn.Module`` s built from AutoencoderConfig.

The shape is the first stage of Latent Diffusion (Rombach et al. 2022, "High-Resolution Image
Synthesis with Latent Diffusion Models", and the VQGAN autoencoder of Esser et al. 2021 it is
based on), shrunk for 8-64 px images on a CPU::

    x (B, C, H, W) ─conv_in─► levels (ResBlocks, stride-2 conv between) ─► mid ─► head ─► (B, c', h, w)
    z (B, c, h, w) ─conv_in─► mid ─► levels (ResBlocks, nearest-up + conv between) ─► (B, C, H, W)

with ``h = H / 2**(len(channel_mults) - 1)``. The middle block (ResBlock, self-attention,
ResBlock) has its attention only when the latent grid is at most 8x8 (64 positions): there it is
cheap and lets every latent see the whole image; at larger grids it would cost more than it pays.

Two regularisers of the latent space (``kind``):

- ``kl``: the head predicts a diagonal Gaussian posterior ``q(z|x) = N(mean, exp(logvar))``
  (c' = 2c); training decodes a sample ``z = mean + std * eps`` and pays ``KL(q || N(0, I))``
  (Kingma & Welling 2014). :meth:`Autoencoder.latents` is the posterior mean.
- ``vq``: the head predicts ``z_e`` (c' = c), snapped to its nearest code vector of a codebook of
  ``codebook_size`` entries (van den Oord et al. 2017, "Neural Discrete Representation
  Learning"); gradients pass the snap straight through. The codebook follows the encoder outputs
  by exponential moving averages (the paper's appendix; Razavi et al. 2019) instead of a codebook
  loss: with Adam, a codebook loss moves rarely chosen codes barely at all, the EMA version moves
  each code to the mean of what it was chosen for, which converges faster and needs no learning
  rate. Codes unused for a while are restarted at random encoder outputs (Dhariwal et al. 2020,
  "Jukebox"), so a small codebook stays in use.

Public contract (what latent families rely on): :attr:`Autoencoder.kind`, :attr:`latent_shape`,
:attr:`codebook_size`, :meth:`latents`, :meth:`tokens`, :meth:`decode`, :meth:`decode_tokens`, and
:func:`autoencoder_net` to build one from a saved model config.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from aigc.config import AutoencoderConfig

__all__ = ["Autoencoder", "VectorQuantizer", "autoencoder_net", "kl_divergence", "latent_scale"]

MAX_ATTN_RES = 8  # self-attention in the middle block only on latent grids up to 8x8
LOGVAR_RANGE = (-30.0, 20.0)  # LDM's clamp of the posterior log-variance: keeps exp() finite


def _norm(ch: int) -> nn.GroupNorm:
    # 8 groups (or fewer when ch is not divisible): the widths here are 8-256 channels, where
    # LDM's 32 groups would normalise single channels (instance norm) at the small end.
    return nn.GroupNorm(math.gcd(8, ch), ch, eps=1e-6)


class ResBlock(nn.Module):
    """GN-SiLU-conv3x3, GN-SiLU-conv3x3, plus a (1x1 when widths differ) skip: ``(B, cin, H, W) ->
    (B, cout, H, W)``."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        # Each block starts as (a projection of) the identity, so the untrained net is shallow and
        # its first steps train like a small net (as the UNet's blocks here, and Goyal et al. 2017).
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Single-head self-attention over the pixels of ``(B, C, H, W)``, residual (as in LDM's AttnBlock)."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = _norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).flatten(2).transpose(1, 2).chunk(3, dim=-1)  # (B, HW, C) each
        o = F.scaled_dot_product_attention(q, k, v)  # (B, HW, C)
        return x + self.out(o.transpose(1, 2).reshape(b, c, h, w))


class MidBlock(nn.Module):
    """ResBlock, self-attention (when ``attention``), ResBlock; ``(B, ch, h, w)`` in and out."""

    def __init__(self, ch: int, attention: bool):
        super().__init__()
        self.res1 = ResBlock(ch, ch)
        self.attn = SelfAttention(ch) if attention else nn.Identity()
        self.res2 = ResBlock(ch, ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res2(self.attn(self.res1(x)))


class Encoder(nn.Module):
    """``(B, C, H, W)`` in [-1, 1] -> ``(B, out_channels, H/f, W/f)``, f = 2**(levels-1)."""

    def __init__(
        self,
        channels: int,
        base: int,
        mults: list[int],
        num_res_blocks: int,
        out_channels: int,
        attention: bool,
    ):
        super().__init__()
        self.conv_in = nn.Conv2d(channels, base, 3, padding=1)
        blocks: list[nn.Module] = []
        ch = base
        for i, m in enumerate(mults):
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(ch, base * m))
                ch = base * m
            if i < len(mults) - 1:
                blocks.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))  # halve H and W
        self.down = nn.Sequential(*blocks)
        self.mid = MidBlock(ch, attention)
        self.norm_out = _norm(ch)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.down(self.conv_in(x)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv (no checkerboard artefacts of transposed convs)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Decoder(nn.Module):
    """``(B, latent_channels, h, w)`` -> ``(B, C, h*f, w*f)``, unclamped (roughly [-1, 1])."""

    def __init__(
        self,
        channels: int,
        base: int,
        mults: list[int],
        num_res_blocks: int,
        latent_channels: int,
        attention: bool,
    ):
        super().__init__()
        ch = base * mults[-1]
        self.conv_in = nn.Conv2d(latent_channels, ch, 3, padding=1)
        self.mid = MidBlock(ch, attention)
        blocks: list[nn.Module] = []
        for i in reversed(range(len(mults))):
            # One block more than the encoder per level, as LDM's decoder: decoding is the harder half.
            for _ in range(num_res_blocks + 1):
                blocks.append(ResBlock(ch, base * mults[i]))
                ch = base * mults[i]
            if i > 0:
                blocks.append(Upsample(ch))
        self.up = nn.Sequential(*blocks)
        self.norm_out = _norm(ch)
        self.conv_out = nn.Conv2d(ch, channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.up(self.mid(self.conv_in(z)))
        return self.conv_out(F.silu(self.norm_out(h)))


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) per image ``(B,)``, summed over ``(c, h, w)``, in nats.

    Closed form for diagonal Gaussians (Kingma & Welling 2014, appendix B):
    ``0.5 * sum(mean^2 + exp(logvar) - 1 - logvar)``.
    """
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)


class VectorQuantizer(nn.Module):
    """Nearest-neighbour quantisation to a codebook ``(K, c)`` with EMA updates (van den Oord et al.
    2017, appendix A.1; Razavi et al. 2019) and restarts of dead codes.

    Buffers, not parameters: the codebook is never touched by the optimiser. Under DDP the batch
    statistics are summed over ranks before the update, so every rank makes the same update; the
    restarts draw random encoder outputs per rank, and DDP's buffer broadcast (rank 0's buffers at
    every forward) makes rank 0's choice everyone's.
    """

    def __init__(
        self, codebook_size: int, dim: int, decay: float, eps: float = 1e-5, restart_below: float = 0.1
    ):
        super().__init__()
        self.codebook_size, self.dim, self.decay, self.eps = codebook_size, dim, decay, eps
        # A code whose EMA count (expected uses per batch) drops below this is restarted.
        self.restart_below = restart_below
        self.register_buffer("codebook", torch.randn(codebook_size, dim) * 0.1)  # (K, c)
        self.register_buffer("ema_count", torch.ones(codebook_size))  # (K,) EMA of uses per batch
        self.register_buffer("ema_sum", self.codebook.clone())  # (K, c) EMA of the sum of assigned z_e
        self.register_buffer("initialized", torch.tensor(False))

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code vector: ``(B, c, h, w)`` -> ``(B, h, w)`` long."""
        b, c, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, c).float()  # (BHW, c)
        cb = self.codebook.float()
        # ||z - e||^2 = ||z||^2 - 2 z.e + ||e||^2; ||z||^2 is the same for every code.
        dist_ = cb.pow(2).sum(1)[None] - 2 * flat @ cb.t()  # (BHW, K)
        return dist_.argmin(1).view(b, h, w)

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """Code vectors of ``codes (B, h, w)`` long -> ``(B, c, h, w)``."""
        if codes.dtype not in (torch.int64, torch.int32) or codes.dim() != 3:
            raise ValueError(f"codes must be integer (B, h, w), got {codes.dtype} {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(
                f"codes must be in [0, {self.codebook_size}), got [{int(codes.min())}, {int(codes.max())}]"
            )
        return F.embedding(codes.long(), self.codebook).permute(0, 3, 1, 2)

    def forward(
        self, z: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """``z_e (B, c, h, w)`` -> (z_q with straight-through gradient, codes (B, h, w), commitment
        ``||z_e - sg[e]||^2`` (mean), info: ``usage`` share of codes used in the batch, ``perplexity``
        of the batch's code distribution). Updates the codebook when training."""
        if self.training and not bool(self.initialized):
            self._init_from(z.detach())
        codes = self.codes(z)  # (B, h, w)
        if self.training:
            self._ema_update(z.detach(), codes)
        e = self.embed(codes).to(z.dtype)  # (B, c, h, w)
        commitment = F.mse_loss(z.float(), e.detach().float())
        # Straight-through: forward e, backward identity to z. Without a gradient to pass, e itself
        # (z + (e - z) is e only up to rounding).
        z_q = z + (e - z).detach() if z.requires_grad else e
        counts = torch.bincount(codes.flatten(), minlength=self.codebook_size).float()  # (K,)
        p = counts / counts.sum()
        info = {
            "usage": (counts > 0).float().mean(),
            "perplexity": torch.exp(-(p * torch.log(p.clamp(min=1e-10))).sum()),
        }
        return z_q, codes, commitment, info

    @torch.no_grad()
    def _init_from(self, z: torch.Tensor) -> None:
        """Codebook = random encoder outputs of the first batch (codes start where the data is)."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, self.dim).float()
        idx = torch.randint(0, flat.shape[0], (self.codebook_size,), device=flat.device)
        idx[: min(self.codebook_size, flat.shape[0])] = torch.randperm(flat.shape[0], device=flat.device)[
            : self.codebook_size
        ]
        self._broadcast_set(flat[idx])
        self.initialized.fill_(True)

    def _broadcast_set(self, codebook: torch.Tensor) -> None:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast(codebook, src=0)
        self.codebook.copy_(codebook)
        self.ema_sum.copy_(codebook)
        self.ema_count.fill_(1.0)

    @torch.no_grad()
    def _ema_update(self, z: torch.Tensor, codes: torch.Tensor) -> None:
        flat = z.permute(0, 2, 3, 1).reshape(-1, self.dim).float()  # (N, c)
        onehot = F.one_hot(codes.flatten(), self.codebook_size).float()  # (N, K)
        count = onehot.sum(0)  # (K,)
        total = onehot.t() @ flat  # (K, c)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(count)
            dist.all_reduce(total)
        self.ema_count.mul_(self.decay).add_(count, alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(total, alpha=1 - self.decay)
        # Laplace smoothing of the counts (Razavi et al.'s reference code) so no code divides by 0.
        n = self.ema_count.sum()
        smoothed = (self.ema_count + self.eps) / (n + self.codebook_size * self.eps) * n
        self.codebook.copy_(self.ema_sum / smoothed[:, None])
        dead = self.ema_count < self.restart_below
        if bool(dead.any()):
            picks = flat[torch.randint(0, flat.shape[0], (int(dead.sum()),), device=flat.device)]
            self.codebook[dead] = picks
            self.ema_sum[dead] = picks
            self.ema_count[dead] = 1.0


class Autoencoder(nn.Module):
    """A KL or VQ image autoencoder (see the module docstring); ``x`` is always in [-1, 1]."""

    def __init__(self, config: AutoencoderConfig, image_size: int, channels: int):
        super().__init__()
        config.check_image_size(image_size)
        self.kind: str = config.kind
        self.image_size, self.channels = int(image_size), int(channels)
        f = config.downsampling()
        c, h = config.latent_channels, image_size // f
        self.latent_shape: tuple[int, int, int] = (c, h, h)
        self.codebook_size: int | None = config.codebook_size if self.kind == "vq" else None
        attention = h <= MAX_ATTN_RES
        head = 2 * c if self.kind == "kl" else c  # kl: mean and log-variance
        mults, base, nrb = list(config.channel_mults), config.base_channels, config.num_res_blocks
        self.encoder = Encoder(channels, base, mults, nrb, head, attention)
        self.decoder = Decoder(channels, base, mults, nrb, c, attention)
        self.quantizer = (
            VectorQuantizer(config.codebook_size, c, config.codebook_ema) if self.kind == "vq" else None
        )

    # ------------------------------------------------------------------------------ contract
    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """KL only: ``(mean, logvar)`` of q(z|x), each ``(B, c, h, w)``."""
        if self.kind != "kl":
            raise ValueError("posterior() is for kind='kl' autoencoders; this one is 'vq'")
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def latents(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic latents ``(B, c, h, w)`` of ``x (B, C, H, W)``: the KL posterior mean, or
        the VQ code vectors."""
        self._check_images(x)
        if self.kind == "kl":
            return self.posterior(x)[0]
        return self.quantizer.embed(self.tokens(x)).to(x.dtype)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """VQ only: code indices ``(B, h, w)`` long of ``x (B, C, H, W)``."""
        if self.kind != "vq":
            raise ValueError("tokens() needs a kind='vq' autoencoder; a 'kl' one has continuous latents")
        self._check_images(x)
        return self.quantizer.codes(self.encoder(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents ``(B, c, h, w)`` -> images ``(B, C, H, W)``, roughly [-1, 1], not clamped.

        VQ: ``z`` is decoded as given (not snapped to the codebook); snap with :meth:`quantize`."""
        if tuple(z.shape[1:]) != self.latent_shape:
            raise ValueError(
                f"latents must be (B, {', '.join(map(str, self.latent_shape))}), got {tuple(z.shape)}"
            )
        return self.decoder(z)

    def decode_tokens(self, codes: torch.Tensor) -> torch.Tensor:
        """VQ only: code indices ``(B, h, w)`` long -> images ``(B, C, H, W)``."""
        if self.kind != "vq":
            raise ValueError("decode_tokens() needs a kind='vq' autoencoder")
        if tuple(codes.shape[1:]) != self.latent_shape[1:]:
            raise ValueError(
                f"codes must be (B, {self.latent_shape[1]}, {self.latent_shape[2]}), got {tuple(codes.shape)}"
            )
        return self.decoder(self.quantizer.embed(codes))

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """VQ only: ``z (B, c, h, w)`` snapped to its nearest code vectors, and the codes ``(B, h, w)``."""
        if self.kind != "vq":
            raise ValueError("quantize() needs a kind='vq' autoencoder")
        codes = self.quantizer.codes(z)
        return self.quantizer.embed(codes).to(z.dtype), codes

    # ------------------------------------------------------------------------------ training
    def forward(
        self, x: torch.Tensor, generator: torch.Generator | None = None, sample: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Reconstruct ``x (B, C, H, W)``: ``(recon (B, C, H, W), aux (B,) or scalar, info)``.

        KL: ``aux`` is the KL per image ``(B,)`` in nats; the decoder sees a posterior sample when
        ``sample`` (training), else the mean. VQ: ``aux`` is the commitment term (scalar) and
        ``info`` holds ``codes``, ``usage`` and ``perplexity``; the codebook moves when training.
        """
        self._check_images(x)
        if self.kind == "kl":
            mean, logvar = self.posterior(x)
            z = mean
            if sample:
                eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
                z = mean + torch.exp(0.5 * logvar) * eps  # the reparameterisation trick
            kl = kl_divergence(mean.float(), logvar.float())
            return self.decoder(z), kl, {"mean": mean, "logvar": logvar}
        z_q, codes, commitment, info = self.quantizer(self.encoder(x))
        return self.decoder(z_q), commitment, {"codes": codes, **info}

    def _check_images(self, x: torch.Tensor) -> None:
        want = (self.channels, self.image_size, self.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(
                f"images must be (B, {', '.join(map(str, want))}) in [-1, 1], got {tuple(x.shape)}"
            )


def autoencoder_net(model: dict[str, Any] | AutoencoderConfig, image_size: int, channels: int) -> Autoencoder:
    """Build the net from the model config (the JSON dict of AutoencoderConfig, as saved in an
    export's config.json / a checkpoint's hyperparameters, or the config itself)."""
    from aigc.config import AutoencoderConfig, validate

    if isinstance(model, dict):
        model = validate(AutoencoderConfig, dict(model, family="autoencoder"), prefix="model")
    return Autoencoder(model, image_size, channels)


@torch.no_grad()
def latent_scale(latents: torch.Tensor) -> float:
    """``1 / std`` of a batch of latents ``(N, c, h, w)``: LDM's scale factor (Rombach et al. 2022,
    sec. 4.3.2 / appendix G), by which latents are multiplied so a diffusion model sees unit variance."""
    if latents.numel() < 2:
        raise ValueError("latent_scale needs at least 2 latent values")
    std = float(latents.detach().float().std())
    if not std > 0:
        raise ValueError(f"latents have std {std}: cannot scale them to unit variance")
    return 1.0 / std

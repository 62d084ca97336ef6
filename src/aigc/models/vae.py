"""Conditional VAE (Kingma & Welling 2014; Sohn et al. 2015): q(z|x,c), p(x|z,c), prior N(0, I).

Objective, per image, in nats (the negative ELBO when ``beta = 1``)::

    loss = recon + beta * KL(q(z|x,c) || N(0, I)),   z = mu + sigma * eps,  eps ~ N(0, I)
    recon = sum over pixels of 0.5 * ((x - x_hat) / s)^2 + log s + 0.5 * log(2 pi)

The decoder is Gaussian with one standard deviation ``s`` for every pixel. ``model.recon_sigma``
fixes it; left at ``None`` it is the batch's maximum-likelihood value ``s = sqrt(MSE)`` (the
"analytic" sigma-VAE of Rybkin et al. 2021), which balances reconstruction against KL without a
hand-tuned weight. ``recon`` can then be negative: it is a density, not a probability.

``kl_warmup_steps`` ramps the KL weight from 0 to ``beta`` (Bowman et al. 2016) and ``free_bits``
keeps a floor of nats per latent dimension (Kingma et al. 2016); both are off by default and only
touch the training objective. ``train/kl`` and ``val/*`` always report the plain KL and the plain
``recon + beta * KL``, so they are comparable across steps.

``beta > 1`` is the beta-VAE of Higgins et al. (2017): the latent is pushed harder towards the prior,
so more of what the decoder needs must come from the caption and samples drawn from the prior land
where the decoder was trained (see models/vae.md for why the shipped config uses 2).

Logged: ``train/loss``, ``train/recon``, ``train/kl``; ``val/loss`` = ``recon + beta * KL`` (the
negative ELBO when ``beta = 1``) on a fixed reparameterisation noise per batch, ``val/recon``,
``val/kl``.
Sampling: ``z ~ N(0, temperature^2 I)`` and the decoder mean.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from aigc.models.base import GenerativeModule, ModuleSpec, make_generator, valid_rows
from aigc.models.nets.vae import VAEDecoder, VAEEncoder

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def gaussian_nll(x: torch.Tensor, mean: torch.Tensor, sigma: float | None) -> torch.Tensor:
    """Per-image Gaussian NLL (B,) summed over pixels; ``sigma=None``: s = sqrt(batch MSE)."""
    sq = (x - mean).pow(2).flatten(1)  # (B, C*H*W)
    if sigma is None:
        # Floor at s = 1e-3 ([-1, 1] units, ~1/8 of a uint8 level) so a perfect fit stays finite.
        log_s = 0.5 * torch.log(sq.mean().clamp(min=1e-6))
    else:
        log_s = torch.tensor(math.log(sigma), device=x.device)
    return (0.5 * sq * torch.exp(-2 * log_s) + log_s + _HALF_LOG_2PI).sum(1)


def kl_per_dim(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, 1)) per latent dimension, (B, L)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)


class VAEModule(GenerativeModule):
    """Conditional VAE family (see the module docstring and ``models/vae.md``)."""

    family = "vae"
    generate_options = {"temperature": float}

    def build_nets(self, spec: ModuleSpec) -> None:
        m = spec.model
        self.encoder = VAEEncoder(
            m.latent_dim, m.text.dim, spec.image_size, spec.channels, m.base_channels, m.cond_dim
        )
        self.decoder = VAEDecoder(
            m.latent_dim, m.text.dim, spec.image_size, spec.channels, m.base_channels, m.cond_dim
        )

    def elbo_terms(self, x: torch.Tensor, captions: list[str], generator: torch.Generator | None = None):
        """(recon (B,), kl per dim (B, L)) for images ``x`` (B, C, H, W) and their captions."""
        text = self.encode_text(captions)[2]  # (B, D)
        mu, logvar = self.encoder(x, text)  # (B, L) each
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        z = mu + torch.exp(0.5 * logvar) * eps  # the reparameterisation trick
        x_hat = self.decoder(z, text).float()  # NLL in float32 also under autocast
        recon = gaussian_nll(x.float(), x_hat, self.model_cfg.recon_sigma)
        return recon, kl_per_dim(mu.float(), logvar.float())

    def kl_weight(self) -> float:
        """beta, ramped linearly over ``kl_warmup_steps`` optimiser steps."""
        m = self.model_cfg
        if m.kl_warmup_steps <= 0:
            return m.beta
        return m.beta * min(1.0, (self.global_step + 1) / m.kl_warmup_steps)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        recon, kl_dims = self.elbo_terms(batch["image"], batch["caption"])
        kl_batch = kl_dims.mean(0)  # (L,) nats per dimension, batch mean
        free_bits = self.model_cfg.free_bits
        kl_term = kl_batch.clamp(min=free_bits).sum() if free_bits else kl_batch.sum()
        recon = recon.mean()
        loss = recon + self.kl_weight() * kl_term
        b = len(batch["caption"])
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        self.log("train/recon", recon, batch_size=b)
        self.log("train/kl", kl_batch.sum(), batch_size=b)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        x, captions = valid_rows(batch)
        if not captions:
            return None
        g = make_generator(batch_idx, self.device)  # the same noise at every validation
        recon, kl_dims = self.elbo_terms(x, captions, generator=g)
        recon, kl = recon.mean(), kl_dims.sum(1).mean()
        loss = recon + self.model_cfg.beta * kl
        b = len(captions)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=b)
        self.log("val/recon", recon, sync_dist=True, batch_size=b)
        self.log("val/kl", kl, sync_dist=True, batch_size=b)
        return loss

    def _generate(
        self, captions: list[str], generator: torch.Generator, temperature: float | None = None
    ) -> torch.Tensor:
        t = self.model_cfg.temperature if temperature is None else temperature
        if not t >= 0:
            raise ValueError(f"temperature must be >= 0, got {t!r}")
        text = self.encode_text(captions)[2]  # (N, D)
        z = t * torch.randn(len(captions), self.model_cfg.latent_dim, generator=generator, device=self.device)
        return self.decoder(z, text)  # (N, C, H, W), the Gaussian mean; to_uint8 clamps to [-1, 1]

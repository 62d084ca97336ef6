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

Editing (``edit_modes``: img2img, interpolate; the contract is :meth:`GenerativeModule.generate`'s
and :meth:`GenerativeModule.interpolate`'s), both through the latent z the decoder reads:

- image-to-image: the encoder's posterior mean ``mu`` of the input, with the **prompt** as its
  caption (the caption the decoder then reads; the input's own caption is unknown), is mixed with
  the prior sample text-to-image draws from the same seed, variance-preserving::

      z = sqrt(1 - s^2) * mu + s * (temperature * eps),   s = strength

  the forward noising of DDPM (Ho et al. 2020), with ``abar = 1 - s^2``, that SDEdit (Meng et al.
  2022) noises its input with, here on the VAE's latent: the decoder has no reverse chain and reads
  the mixed z directly. Mixing variances keeps z at the scale of its parts, ``Var z = (1 - s^2)
  Var mu + s^2 temperature^2``, where the decoder was trained; a linear blend ``(1 - s) mu + s eps``
  shrinks it in between (to half at s = 0.5 for two unit-variance parts).
  ``eps`` is drawn first and exactly as text-to-image draws it, so strength 1 is text-to-image with
  the same seed, bit for bit (the encoder is not run). Strength 0 is the VAE's reconstruction of the
  input with the prompt, ``decoder(mu, prompt)`` (the CVAE's style transfer: the latent keeps what
  the caption does not say, the decoder draws the prompt; Kingma et al. 2014, *Semi-supervised
  Learning with Deep Generative Models*, its "analogies"), not the input itself: unlike
  diffusion, the VAE's decoder reads the prompt at every strength.
- no inpainting: the masked region would have to be drawn from ``p(z | kept pixels, caption)``,
  which the encoder (trained on whole images) does not give; the pseudo-Gibbs chain through encoder
  and decoder of Rezende et al. (2014) need not converge to it (Mattei & Frellsen 2018), and a
  Metropolis-within-Gibbs sampler is beyond a cheap edit, so it is left out.
- interpolation: slerp of the two seeds' prior samples ``temperature * eps`` (:func:`slerp`), linear
  interpolation of the two prompts' pooled text features (what the decoder reads). The end frames
  are decoded alone, as ``generate`` decodes one prompt, so they are its images bit for bit.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from aigc.models.base import (
    EditRequest,
    GenerativeModule,
    ModuleSpec,
    latent_walk,
    make_generator,
    valid_rows,
)
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
    edit_modes = frozenset({"img2img", "interpolate"})

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

    def _temperature(self, temperature: float | None) -> float:
        """The prior's standard deviation: the option, else ``model.temperature``; checked."""
        t = self.model_cfg.temperature if temperature is None else temperature
        if not t >= 0:
            raise ValueError(f"temperature must be >= 0, got {t!r}")
        return t

    def _prior(self, n: int, generator: torch.Generator, t: float) -> torch.Tensor:
        """``n`` prior samples ``t * eps (n, L)``: text-to-image's latents, and what the edits draw."""
        return t * torch.randn(n, self.model_cfg.latent_dim, generator=generator, device=self.device)

    def _generate(
        self,
        captions: list[str],
        generator: torch.Generator,
        temperature: float | None = None,
        edit: EditRequest | None = None,
    ) -> torch.Tensor:
        if edit is not None and edit.masks is not None:  # generate() refuses masks; a direct call too
            self._require_edit_mode("inpaint", "masks")
        t = self._temperature(temperature)
        text = self.encode_text(captions)[2]  # (N, D)
        z = self._prior(len(captions), generator, t)  # (N, L), drawn first also when editing
        if edit is not None and edit.strength < 1:  # image-to-image (see the module docstring)
            s = edit.strength
            mu = self.encoder(edit.images, text)[0]  # (N, L): the posterior mean, with the prompt
            z = math.sqrt(1.0 - s * s) * mu + s * z  # strength 0: mu exactly
        return self.decoder(z, text)  # (N, C, H, W), the Gaussian mean; to_uint8 clamps to [-1, 1]

    def _interpolate(
        self,
        prompt_a: str,
        prompt_b: str,
        frames: int,
        seed: int,
        seed_b: int,
        temperature: float | None = None,
    ) -> torch.Tensor:
        """Frames (frames, C, H, W) in [-1, 1] (see GenerativeModule.interpolate): slerp of the two
        seeds' prior samples, lerp of the two prompts' pooled text features, the decoder mean.

        The end frames are decoded alone, from the end points' own latent and feature, as
        ``generate`` decodes one prompt: so they are its images bit for bit.
        """
        t = self._temperature(temperature)
        # Each seed's prior sample as generate() draws it for one caption: a fresh generator's first draw.
        za, zb = (self._prior(1, make_generator(s, self.device), t) for s in (seed, seed_b))  # (1, L)
        pa, pb = (self.encode_text([p])[2] for p in (prompt_a, prompt_b))  # (1, D) each
        return latent_walk(self.decoder, (za, zb), (pa, pb), frames)

"""Image autoencoder family: the first stage of latent generative models (models/autoencoder.md).

Latent Diffusion (Rombach et al. 2022) splits text-to-image into an autoencoder that compresses
images to a small latent grid and a generative model that learns on those latents; this module
trains the first half. The net (:mod:`aigc.models.nets.autoencoder`) lives in ``self.autoencoder``,
so its weights are the ``autoencoder.*`` entries of a checkpoint or export: a latent family copies
exactly those into its own ``self.autoencoder``.

Objective per batch (``D = C*H*W`` pixels per image)::

    kl: loss = recon + kl_weight * KL / D              KL = KL(q(z|x) || N(0, I)) in nats per image
    vq: loss = recon + commitment * ||z_e - sg[e]||^2  (the codebook follows by EMA, no loss term)
    recon = mean |x - x_hat| (l1) or mean (x - x_hat)^2 (l2) over pixels, x in [-1, 1]

``kl_weight`` keeps LDM's meaning: LDM sums both terms over each image; dividing both by ``D``
changes only the loss's scale, which Adam ignores, and leaves ``recon`` readable per pixel.

Logged: ``train/loss``, ``train/recon``, ``train/kl`` (nats per image) or ``train/vq`` (commitment
MSE) with ``train/codebook_usage`` (share of codes used in the batch) and ``train/perplexity``;
``val/loss`` = MSE of the deterministic reconstruction (posterior mean / quantised codes) on the
valid rows, ``val/psnr`` (dB, of that MSE, 2 = the [-1, 1] range as peak).

``generate`` is not text-to-image: an autoencoder has no text condition, so it ignores the prompts
and decodes draws from the latent prior (kl: ``N(0, temperature^2 I)`` latents; vq: uniformly random
codes). With LDM's tiny KL weight the aggregate posterior is far from N(0, I), so these are only a
look at the latent space; the text-to-image model is a latent family trained on this one's latents.
It exists so ``aigc train``'s sample grids, the registry's pyfunc and serving treat every family
alike. What an autoencoder is judged by is :meth:`AutoencoderModule.reconstruct` (the final
evaluation measures reconstructions: :func:`aigc.evaluation.evaluate.evaluate_reconstruction`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from aigc.models.base import GenerativeModule, ModuleSpec, to_uint8, valid_rows
from aigc.models.nets.autoencoder import Autoencoder, latent_scale

__all__ = ["AutoencoderModule", "latent_scale", "psnr"]


def psnr(mse: torch.Tensor | float, peak_to_peak: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB of a mean squared error: ``10 log10(range^2 / mse)``."""
    mse = float(mse)
    return float("inf") if mse <= 0 else 10.0 * math.log10(peak_to_peak**2 / mse)


class AutoencoderModule(GenerativeModule):
    """KL / VQ image autoencoder family (see the module docstring and ``models/autoencoder.md``)."""

    family = "autoencoder"
    # Not text-conditioned: no text encoder is built (model.text is accepted and unused), and the
    # text_encoder.* entries of checkpoints and exports of older versions are dropped on load.
    text_conditioned = False
    generate_options = {"temperature": float}

    def build_nets(self, spec: ModuleSpec) -> None:
        # A latent dataset never gets here: latent_kinds is empty, so the base class refuses it.
        self.autoencoder = Autoencoder(spec.model, spec.image_size, spec.channels)

    # ---------------------------------------------------------------------------------- losses
    def recon_loss(self, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        """Mean pixel loss (``model.recon_loss``) in float32 also under autocast."""
        if self.model_cfg.recon_loss == "l1":
            return F.l1_loss(x_hat.float(), x.float())
        return F.mse_loss(x_hat.float(), x.float())

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        x = batch["image"]  # (B, C, H, W) in [-1, 1]
        m, b = self.model_cfg, x.shape[0]
        x_hat, aux, info = self.autoencoder(x)
        recon = self.recon_loss(x, x_hat)
        if self.autoencoder.kind == "kl":
            kl = aux.mean()  # nats per image
            loss = recon + m.kl_weight * kl / x[0].numel()
            self.log("train/kl", kl, batch_size=b)
        else:
            loss = recon + m.commitment * aux
            self.log("train/vq", aux, batch_size=b)
            self.log("train/codebook_usage", info["usage"], batch_size=b)
            self.log("train/perplexity", info["perplexity"], batch_size=b)
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        self.log("train/recon", recon, batch_size=b)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        x, _ = valid_rows(batch)
        if x.shape[0] == 0:
            return None
        x_hat = self.autoencoder(x, sample=False)[0]  # deterministic: posterior mean / codes
        mse = F.mse_loss(x_hat.float().clamp(-1, 1), x.float())
        b = x.shape[0]
        self.log("val/loss", mse, prog_bar=True, sync_dist=True, batch_size=b)
        self.log("val/psnr", 10.0 * torch.log10(4.0 / mse.clamp(min=1e-10)), sync_dist=True, batch_size=b)
        return mse

    # ------------------------------------------------------------------------------ inference
    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Deterministic reconstructions, uint8 ``(N, C, H, W)``, of ``images``: uint8 in [0, 255]
        or float in [-1, 1], ``(N, C, H, W)``."""
        if images.dtype == torch.uint8:
            x = images.float() / 127.5 - 1.0
        elif images.is_floating_point():
            x = images
        else:
            raise ValueError(f"images must be uint8 [0, 255] or float [-1, 1], got {images.dtype}")
        was_training = self.training
        self.eval()
        try:
            out = [
                to_uint8(self.autoencoder(x[i : i + batch_size].to(self.device), sample=False)[0])
                for i in range(0, x.shape[0], batch_size)
            ]
        finally:
            self.train(was_training)
        return (
            torch.cat(out)
            if out
            else torch.empty(0, self.channels, self.image_size, self.image_size, dtype=torch.uint8)
        )

    def _generate(
        self, captions: list[str], generator: torch.Generator, temperature: float | None = None
    ) -> torch.Tensor:
        # The prompts only set the count: an autoencoder is not text-conditioned (module docstring).
        n, ae = len(captions), self.autoencoder
        if ae.kind == "vq":
            codes = torch.randint(
                0, ae.codebook_size, (n, *ae.latent_shape[1:]), generator=generator, device=self.device
            )
            return ae.decode_tokens(codes)
        t = self.model_cfg.temperature if temperature is None else temperature
        if not t >= 0:
            raise ValueError(f"temperature must be >= 0, got {t!r}")
        z = t * torch.randn(n, *ae.latent_shape, generator=generator, device=self.device)
        return ae.decode(z)

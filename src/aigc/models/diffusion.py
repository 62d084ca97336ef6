"""Text-to-image diffusion: a DDPM trained with classifier-free guidance, sampled with DDIM or DDPM.

Objective (Ho et al. 2020): draw ``t ~ U{0..T-1}``, ``eps ~ N(0, I)``, form
``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` and minimise ``|| target - f(x_t, t, text) ||^2``
where the target is ``eps`` or the velocity ``v`` (Salimans & Ho 2022), see
:mod:`aigc.models.schedulers`. The UNet (:mod:`aigc.models.nets.unet`) reads the
caption through the shared text encoder, by cross-attention to its tokens (as Stable Diffusion does)
or by FiLM from its pooled feature.

Classifier-free guidance (Ho & Salimans 2022): during training each caption is replaced by the
empty caption ``""`` with probability ``cond_drop_prob``, so one network learns both the conditional
and the unconditional model; sampling mixes them as ``out = out_u + w (out_c - out_u)`` with
``w = guidance`` (``w = 1`` is the plain conditional model, ``w = 0`` the unconditional one), both
halves in one batched forward pass.

EMA: an exponential moving average of the UNet and the text encoder (``ema_unet``,
``ema_text_encoder``) is updated after every optimiser step with decay
``min(ema_decay, (1 + n) / (10 + n))`` (a warm-up, so early EMA weights are not mostly the random
init). It is part of the state dict, so checkpoints and exports carry it; sampling and
``val/loss`` use it.

Latent diffusion (Rombach et al. 2022, *LDM*, the Stable Diffusion recipe): trained on a latent
dataset of KL latents (``aigc data encode``), the UNet works on the latents ``(c, h, w)`` times the
dataset's scale factor (unit variance), x0 estimates are not clipped (latents have no [-1, 1]
range), and ``generate`` decodes the sampled latents with the frozen autoencoder the model carries.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from aigc.models.base import GenerativeModule, ModuleSpec, drop_captions, ema_update
from aigc.models.nets.unet import UNet, UNetConfig
from aigc.models.schedulers import DiffusionScheduler, scheduler_class

#: captions per sampling chunk: bounds memory at 64×64 (the guided forward pass doubles it).
SAMPLE_CHUNK = 256
#: seed of the fixed noise and timesteps of ``val/loss``, so values compare across steps and runs.
VAL_SEED = 1234


class DiffusionModule(GenerativeModule):
    """DDPM / DDIM text-to-image model; ``generate(..., steps, guidance, sampler)``."""

    family = "diffusion"
    latent_kinds = ("kl",)
    generate_options = {"steps": int, "guidance": float, "sampler": str}
    option_config_fields = {"steps": "sample_steps"}

    # LoRA: the UNet's attention projections (q, kv, out), its time and text embedding projections,
    # and the text encoder's token embedding (a new word's row can move; its blocks are PyTorch's fused
    # TransformerEncoderLayer, whose inference path would skip adapters: see models/lora.py).
    lora_targets = {
        "unet": ("q", "kv", "out", "emb", "text_proj.0", "text_proj.2"),
        "text_encoder": ("token",),
    }
    ema_nets = {"ema_unet": "unet", "ema_text_encoder": "text_encoder"}

    def build_nets(self, spec: ModuleSpec) -> None:
        c = spec.model
        channels, size = spec.sample_shape[0], spec.sample_shape[-1]  # pixels, or KL latents (c, h, w)
        self.unet = UNet(
            UNetConfig(
                in_channels=channels,
                image_size=size,
                base_channels=c.base_channels,
                channel_mults=tuple(c.channel_mults),
                num_res_blocks=c.num_res_blocks,
                text_dim=c.text.dim,
                conditioning=c.conditioning,
                heads=c.heads,
            )
        )
        # Training only uses the schedule's forward side, which every scheduler class shares.
        self.scheduler = self._new_scheduler()
        self.ema_unet = copy.deepcopy(self.unet).requires_grad_(False)
        self.ema_text_encoder = copy.deepcopy(self.text_encoder).requires_grad_(False)
        # Persistent so that a resumed run continues the EMA warm-up where it stopped.
        self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))

    # ------------------------------------------------------------------------------------ text
    def _encode(self, captions: list[str], ema: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """captions -> tokens (B, T, D), mask (B, T), pooled (B, D), with the EMA encoder if ``ema``."""
        if not ema:
            return self.encode_text(captions)
        return self.ema_text_encoder.encode(captions, self.tokenizer, self.device)

    def _new_scheduler(self, sampler: str | None = None) -> DiffusionScheduler:
        """A scheduler of the ``sampler``'s class (default ``model.sampler``) over the model's chain.

        x0 estimates are clipped to the pixel range [-1, 1] while sampling; latents have no such
        range (unit variance after the scale), so they are not.
        """
        c = self.model_cfg
        cls = scheduler_class(c.sampler if sampler is None else sampler)
        return cls(c.timesteps, c.beta_schedule, c.prediction, clip_sample=self.latent is None)

    def _images(self, batch: dict[str, Any]) -> torch.Tensor:
        """The batch's images (B, C, H, W) in [-1, 1], or its latents times the dataset's scale."""
        x0 = batch["image"]
        expected = self.sample_shape
        if x0.dim() != 4 or tuple(x0.shape[1:]) != expected:
            what = "latents of a dataset encoded with another autoencoder?" if self.latent else "images"
            raise ValueError(
                f"batch['image'] has shape {tuple(x0.shape)}; the model expects (B, *{expected}) {what}"
            )
        if self.latent is not None:
            # LDM (Rombach et al. 2022, sec. 4.3.2): latents scaled to unit variance before diffusion.
            x0 = x0 * float(self.latent["scale"])
        return x0

    # -------------------------------------------------------------------------------- training
    def drop_captions(self, captions: list[str], generator: torch.Generator | None = None) -> list[str]:
        """Each caption replaced by ``""`` with probability ``cond_drop_prob`` (classifier-free guidance)."""
        return drop_captions(captions, self.model_cfg.cond_drop_prob, generator)

    def loss(
        self,
        x0: torch.Tensor,
        captions: list[str],
        generator: torch.Generator | None = None,
        ema: bool = False,
    ) -> torch.Tensor:
        """Per-sample diffusion loss ``(B,)``: mean squared error of the network output against the
        target (eps or v) at uniform random timesteps; noise and timesteps from ``generator``."""
        b = x0.shape[0]
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        t = self.scheduler.sample_timesteps(b, generator=generator, device=x0.device)  # (B,)
        x_t = self.scheduler.add_noise(x0, noise, t)
        tokens, mask, pooled = self._encode(captions, ema=ema)
        out = (self.ema_unet if ema else self.unet)(x_t, t, tokens, mask, pooled)  # (B, C, H, W)
        err = (out.float() - self.scheduler.target(x0, noise, t).float()) ** 2
        return err.flatten(1).mean(1)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        x0 = self._images(batch)  # (B, C, H, W) in [-1, 1]
        loss = self.loss(x0, self.drop_captions(list(batch["caption"]))).mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=x0.shape[0])
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """``val/loss`` of the EMA model on fixed-seed noise and timesteps (comparable over time).

        Padding repeats (``batch["valid"] == False``) are left out, so each val sample counts once.
        """
        x0 = self._images(batch)
        g = torch.Generator(device=x0.device).manual_seed(VAL_SEED + batch_idx)
        per_sample = self.loss(x0, list(batch["caption"]), generator=g, ema=True)  # (B,)
        valid = batch.get("valid")
        if valid is not None:
            valid = valid.to(per_sample.device).bool()
            per_sample = per_sample[valid]
        loss = per_sample.mean() if per_sample.numel() else per_sample.sum()
        self.log("val/loss", loss, prog_bar=True, batch_size=max(1, per_sample.numel()), sync_dist=True)
        return loss

    # ------------------------------------------------------------------------------------- EMA
    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.update_ema()

    def update_ema(self) -> None:
        """One EMA update of ``ema_unet`` and ``ema_text_encoder`` towards the trained weights."""
        pairs = ((self.ema_unet, self.unet), (self.ema_text_encoder, self.text_encoder))
        ema_update(pairs, self.ema_updates, self.model_cfg.ema_decay)

    # ------------------------------------------------------------------------------ generation
    def _guided(
        self,
        x: torch.Tensor,
        t: int,
        cond: tuple[torch.Tensor, ...],
        uncond: tuple[torch.Tensor, ...] | None,
        guidance: float,
    ) -> torch.Tensor:
        """Network output at ``x (N, C, H, W)``, guided: ``out_u + w (out_c - out_u)``."""
        n = x.shape[0]
        tt = torch.full((n,), int(t), dtype=torch.long, device=x.device)
        if uncond is None:  # w == 1: the conditional model alone
            return self.ema_unet(x, tt, *cond)
        if guidance == 0:
            return self.ema_unet(x, tt, *uncond)
        both = [torch.cat([c, u]) for c, u in zip(cond, uncond, strict=True)]
        out = self.ema_unet(torch.cat([x, x]), torch.cat([tt, tt]), *both)  # (2N, C, H, W)
        out_c, out_u = out[:n], out[n:]
        return out_u + guidance * (out_c - out_u)

    def _generate(
        self,
        captions: list[str],
        generator: torch.Generator,
        steps: int | None = None,
        guidance: float | None = None,
        sampler: str | None = None,
    ) -> torch.Tensor:
        c = self.model_cfg
        steps = int(c.sample_steps if steps is None else steps)
        guidance = float(c.guidance if guidance is None else guidance)
        if not 1 <= steps <= c.timesteps:
            raise ValueError(f"option steps must be in 1..{c.timesteps} (model.timesteps), got {steps}")
        if guidance < 0:
            raise ValueError(f"option guidance must be >= 0, got {guidance}")
        # A fresh scheduler per call: set_timesteps mutates it, and serving may call concurrently.
        sched = self._new_scheduler(sampler)  # DDIM at eta = 0 or DDPM (aigc.models.schedulers)
        timesteps = sched.set_timesteps(steps).tolist()
        shape = self.sample_shape  # (C, H, W) pixels or (c, h, w) latents
        empty = None if guidance == 1 else self._encode([""], ema=True)  # (1, T, D), (1, T), (1, D)

        chunks = []
        for start in range(0, len(captions), SAMPLE_CHUNK):
            part = captions[start : start + SAMPLE_CHUNK]
            n = len(part)
            cond = self._encode(part, ema=True)
            uncond = None if empty is None else tuple(e.expand(n, *e.shape[1:]) for e in empty)
            x = torch.randn((n, *shape), generator=generator, device=self.device)  # x_T (n, C, H, W)
            for t in timesteps:
                out = self._guided(x, t, cond, uncond, guidance)
                x = sched.step(out, t, x, generator=generator).prev_sample
            chunks.append(self.decode_latents(x) if self.latent is not None else x)
        return torch.cat(chunks).clamp(-1, 1)

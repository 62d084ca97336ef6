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

Editing (``edit_modes``: img2img, inpaint, interpolate; the contract is
:meth:`GenerativeModule.generate`'s and :meth:`GenerativeModule.interpolate`'s):

- image-to-image, SDEdit (Meng et al. 2022): of the ``steps``-step sampling schedule the last
  ``k = round(strength · steps)`` steps are run, from the input noised by :meth:`add_noise
  <aigc.models.schedulers.DiffusionScheduler.add_noise>` to the first of them (diffusers'
  img2img rule, rounded instead of floored). The noise is the starting noise text-to-image draws,
  drawn first, so ``k = steps`` (strength 1) starts from it as text-to-image does and gives its
  images bit for bit; ``k = 0`` returns the input (a latent model: decoded from its latents).
- inpainting, RePaint (Lugmayr et al. 2022) without its resampling jumps: before every step at
  ``t`` the known region of ``x_t`` is replaced by the input noised to ``t`` (with that same
  starting noise, as diffusers' inpainting does, so nothing more is drawn), and after the last step
  by the clean input. A latent model encodes the input with its autoencoder (posterior mean times
  the scale) and max-pools the mask to the latent grid, so a latent cell that sees any masked pixel
  is regenerated; ``generate`` pastes the known pixels back after decoding.
- interpolation: slerp of the two seeds' starting noise, linear interpolation of the two prompts'
  text features, DDIM at eta 0.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F

from aigc.models.base import (
    EditRequest,
    GenerativeModule,
    ModuleSpec,
    drop_captions,
    ema_update,
    make_generator,
    pool_mask,
    slerp,
)
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
    edit_modes = frozenset({"img2img", "inpaint", "interpolate"})

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

    def _sampling(
        self, steps: int | None, guidance: float | None, sampler: str | None
    ) -> tuple[DiffusionScheduler, list[int], float]:
        """The options resolved against the config and checked: a fresh scheduler, its sampling
        timesteps (descending) and the guidance weight."""
        c = self.model_cfg
        steps = int(c.sample_steps if steps is None else steps)
        guidance = float(c.guidance if guidance is None else guidance)
        if not 1 <= steps <= c.timesteps:
            raise ValueError(f"option steps must be in 1..{c.timesteps} (model.timesteps), got {steps}")
        if guidance < 0:
            raise ValueError(f"option guidance must be >= 0, got {guidance}")
        # A fresh scheduler per call: set_timesteps mutates it, and serving may call concurrently.
        sched = self._new_scheduler(sampler)  # DDIM at eta = 0 or DDPM (aigc.models.schedulers)
        return sched, sched.set_timesteps(steps).tolist(), guidance

    def _denoise(
        self,
        x: torch.Tensor,
        timesteps: list[int],
        sched: DiffusionScheduler,
        cond: tuple[torch.Tensor, ...],
        uncond: tuple[torch.Tensor, ...] | None,
        guidance: float,
        generator: torch.Generator,
        known: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Run the reverse ``timesteps`` from ``x (n, *sample_shape)``; decoded pixels in [-1, 1].

        ``known = (x0, noise, keep)`` inpaints (RePaint without resampling): before each step at
        ``t`` the cells where ``keep (n, 1, h, w)`` is True are set to ``x0`` noised to ``t`` with
        ``noise``, and after the last step to ``x0``.
        """
        for t in timesteps:
            if known is not None:
                x0, noise, keep = known
                tt = torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)
                x = torch.where(keep, sched.add_noise(x0, noise, tt), x)
            out = self._guided(x, t, cond, uncond, guidance)
            x = sched.step(out, t, x, generator=generator).prev_sample
        if known is not None:
            x = torch.where(known[2], known[0], x)
        return self.decode_latents(x) if self.latent is not None else x

    def _generate(
        self,
        captions: list[str],
        generator: torch.Generator,
        steps: int | None = None,
        guidance: float | None = None,
        sampler: str | None = None,
        edit: EditRequest | None = None,
    ) -> torch.Tensor:
        sched, timesteps, guidance = self._sampling(steps, guidance, sampler)
        shape = self.sample_shape  # (C, H, W) pixels or (c, h, w) latents
        empty = None if guidance == 1 else self._encode([""], ema=True)  # (1, T, D), (1, T), (1, D)
        full = len(timesteps)
        if edit is not None:
            # SDEdit: the last round(strength * steps) steps, from the input noised to the first.
            timesteps = timesteps[full - int(edit.strength * full + 0.5) :]

        chunks = []
        for start in range(0, len(captions), SAMPLE_CHUNK):
            part = captions[start : start + SAMPLE_CHUNK]
            n = len(part)
            cond = self._encode(part, ema=True)
            uncond = None if empty is None else tuple(e.expand(n, *e.shape[1:]) for e in empty)
            x = torch.randn((n, *shape), generator=generator, device=self.device)  # x_T (n, C, H, W)
            known = None
            if edit is not None:
                noise = x  # all steps (strength 1): start from this noise, as text-to-image does
                x0 = self._edit_latents(edit.images[start : start + n])  # (n, *shape)
                if not timesteps:  # no step (strength 0): the input itself
                    x = x0
                elif len(timesteps) < full:  # the input noised to the first step's timestep
                    t0 = torch.full((n,), timesteps[0], dtype=torch.long, device=x.device)
                    x = sched.add_noise(x0, noise, t0)
                if edit.masks is not None:
                    known = (x0, noise, ~self._edit_mask(edit.masks[start : start + n]))
            chunks.append(self._denoise(x, timesteps, sched, cond, uncond, guidance, generator, known))
        return torch.cat(chunks).clamp(-1, 1)

    def _edit_latents(self, images: torch.Tensor) -> torch.Tensor:
        """Edit inputs (n, C, H, W) in [-1, 1] -> what the UNet models: the pixels themselves, or
        the KL posterior mean times the dataset's scale (as the latents were trained on)."""
        if self.latent is None:
            return images
        return self.autoencoder.latents(images) * float(self.latent["scale"])

    def _edit_mask(self, masks: torch.Tensor) -> torch.Tensor:
        """Regenerate-masks (n, 1, H, W) bool on the UNet's grid: the pixels themselves, or max-pooled
        to the latent grid (h, w), so a latent cell that sees any masked pixel is regenerated."""
        if self.latent is None:
            return masks
        return pool_mask(masks, self.sample_shape[-2:])

    def _interpolate(
        self,
        prompt_a: str,
        prompt_b: str,
        frames: int,
        seed: int,
        seed_b: int,
        steps: int | None = None,
        guidance: float | None = None,
        sampler: str | None = None,
    ) -> torch.Tensor:
        """Frames (frames, C, H, W) in [-1, 1] (see GenerativeModule.interpolate): slerp of the two
        seeds' x_T, lerp of the two prompts' text features, DDIM at eta 0.

        The end frames are sampled alone, from the end points' own noise and features, as
        ``generate`` samples one caption: so they are its images bit for bit. The frames between are
        one batch; where the prompts' token masks differ see :func:`_blend_masks`.
        """
        if sampler not in (None, "ddim"):
            raise ValueError(
                f"interpolate needs a deterministic sampler: option sampler must be 'ddim' "
                f"(DDIM at eta 0), got {sampler!r}"
            )
        sched, timesteps, guidance = self._sampling(steps, guidance, "ddim")
        shape = self.sample_shape
        # x_T of each seed as generate() draws it for one caption: the first draw of a fresh generator.
        ends = [
            torch.randn((1, *shape), generator=make_generator(s, self.device), device=self.device)
            for s in (seed, seed_b)
        ]
        weights = [i / (frames - 1) for i in range(frames)]
        noise = slerp(ends[0], ends[1], weights)  # (frames, *shape)
        feats = [self._encode([p], ema=True) for p in (prompt_a, prompt_b)]  # tokens, mask, pooled
        empty = None if guidance == 1 else self._encode([""], ema=True)

        def run(rows: slice, cond: tuple[torch.Tensor, ...]) -> torch.Tensor:
            n = cond[0].shape[0]
            uncond = None if empty is None else tuple(e.expand(n, *e.shape[1:]) for e in empty)
            if uncond is not None and cond[1].is_floating_point():  # one batch with the blended masks
                uncond = (uncond[0], _attention_bias(uncond[1], cond[1].dtype), uncond[2])
            g = make_generator(0, self.device)  # DDIM at eta 0 draws nothing from it
            return self._denoise(noise[rows], timesteps, sched, cond, uncond, guidance, g)

        first, last = run(slice(0, 1), feats[0]), run(slice(frames - 1, frames), feats[1])
        if frames == 2:
            return torch.cat([first, last]).clamp(-1, 1)
        w = torch.tensor(weights[1:-1], device=self.device)  # (frames - 2,)
        (ta, ma, pa), (tb, mb, pb) = feats
        if ta.shape[1] != tb.shape[1]:  # token sequences of different lengths: pad the shorter
            length = max(ta.shape[1], tb.shape[1])
            ta, tb = (F.pad(t, (0, 0, 0, length - t.shape[1])) for t in (ta, tb))
            ma, mb = (torch.cat([m, m.new_zeros(1, length - m.shape[1])], 1) for m in (ma, mb))
        tokens = torch.lerp(ta, tb, w[:, None, None])  # (frames - 2, T, D)
        pooled = torch.lerp(pa, pb, w[:, None])  # (frames - 2, D)
        middle = run(slice(1, frames - 1), (tokens, _blend_masks(ma, mb, w, tokens.dtype), pooled))
        return torch.cat([first, middle, last]).clamp(-1, 1)


def _blend_masks(ma: torch.Tensor, mb: torch.Tensor, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The token masks ``(1, T)`` of two prompts for frames at weights ``w (F,)``: ``(F, T)``.

    Equal masks (prompts of the same token length) are kept as they are. Otherwise the frames
    attend to the union, each prompt's own tokens weighted by its share: a float mask, which the
    UNet's cross-attention (``F.scaled_dot_product_attention``) adds to the logits, of ``log(1 - w)``
    where only ``a`` has a token and ``log(w)`` where only ``b`` has one, which scales those tokens'
    attention weights by ``1 - w`` and ``w``. As ``w`` tends to 0 or 1 this tends to the end's own
    mask, so the frames next to the ends stay their neighbours (a boolean union jumps there).
    """
    ma, mb = ma.bool(), mb.bool()
    if torch.equal(ma, mb):
        return ma.expand(w.shape[0], -1)
    w = w.double()[:, None]  # (F, 1)
    bias = _attention_bias(ma | mb, torch.float64).expand(w.shape[0], -1)  # (F, T): 0 or -inf
    bias = torch.where(ma & ~mb, torch.log1p(-w), bias)
    return torch.where(mb & ~ma, torch.log(w), bias).to(dtype)


def _attention_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean token mask ``(B, T)`` (True = attend) as the float mask that attends the same: 0
    where True, -inf where False (added to the attention logits)."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask.bool(), float("-inf"))

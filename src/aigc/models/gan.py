"""Text-conditioned GAN: FiLM generator, projection discriminator with spectral norm.

Objective (``model.loss``): the hinge loss of Lim & Ye (2017) as used by SNGAN/BigGAN, or the
non-saturating loss of Goodfellow et al. (2014). The discriminator also sees *real images with a
wrong caption* (the batch's captions rolled by one) as fakes, weighted by ``mismatch_weight``
(the matching-aware discriminator of Reed et al. 2016): without it D can score realism alone and
G has no reason to follow the caption.

Training uses Lightning's manual optimisation with two Adam optimisers:

* ``opt_d``: the discriminator **and the text encoder**. The projection term and the mismatch term
  give the encoder a direct image-caption matching signal. G reads the pooled caption feature
  detached: if G's loss could move the shared encoder it would be rewarded for making captions
  indistinguishable (D can then no longer penalise the wrong class), so the encoder would be
  pulled in opposite directions by the two players.
* ``opt_g``: the generator. An exponential moving average of G (``ema_decay``, with the usual
  ``(1+n)/(10+n)`` warm-up) is what ``generate`` samples from.

Steps: each batch runs ``d_steps`` discriminator updates and one generator update, and in manual
optimisation Lightning's ``global_step`` counts *every* optimiser step. So ``trainer.max_steps``
(and ``warmup_steps``) are in optimiser steps: ``max_steps = 900`` with ``d_steps = 2`` is 300
batches. The LR schedules are stepped once per batch and read in the same units. Gradient
clipping (``trainer.grad_clip``) is applied here, per optimiser; the Lightning Trainer must be
built without ``gradient_clip_val`` and with ``accumulate_grad_batches=1`` (Lightning refuses both
under manual optimisation).

Logged: ``train/loss_d`` (D's loss, mismatch term included), ``train/loss_g``,
``train/loss = loss_d + loss_g`` (a single number for dashboards; it does not decrease
monotonically in a healthy GAN), and ``val/loss``: D's loss (same formula) on held-out real images
and their captions against fresh fakes. Compared with ``train/loss_d`` it shows D over-fitting the
training images (Karras et al. 2020); it is not a sample-quality measure: select GAN checkpoints
by ``eval/fd``.

Editing (``edit_modes``: interpolate; the contract is :meth:`GenerativeModule.interpolate`'s):
slerp of the two seeds' latents z as :func:`sample_latent` draws them for ``generate``, linear
interpolation of the two prompts' pooled text features, the EMA generator as in ``generate``. With
truncation the drawn, truncated z's are interpolated; slerp stays near their norm, so a frame between
them may have components beyond the bound, by up to ``1 / cos(theta / 2)`` at the midpoint (sqrt 2
for the nearly orthogonal ends high dimensions give), and they are not clamped again. The end
frames are generated alone, so they are ``generate``'s images bit for bit. No image-to-image or
inpainting: a GAN has no encoder, so an input image would first have to be inverted into a z (GAN
inversion, by optimising z or training an encoder; Xia et al. 2022, *GAN Inversion: A Survey*),
which this family does not do.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F

from aigc.models.base import (
    GenerativeModule,
    ModuleSpec,
    ema_update,
    latent_walk,
    make_generator,
    valid_rows,
    warmup_cosine,
)
from aigc.models.nets.gan import Generator, ProjectionDiscriminator


def discriminator_loss(
    real: torch.Tensor, fake: torch.Tensor, mismatch: torch.Tensor, kind: str, mismatch_weight: float
) -> torch.Tensor:
    """D's loss from logits (B,) on (real, caption), (fake, caption) and (real, wrong caption)."""
    if kind == "hinge":  # push real above +1, fakes and mismatches below -1
        relu = F.relu
        return relu(1 - real).mean() + relu(1 + fake).mean() + mismatch_weight * relu(1 + mismatch).mean()
    sp = F.softplus  # -log sigmoid(real) - log(1 - sigmoid(fake)) ...
    return sp(-real).mean() + sp(fake).mean() + mismatch_weight * sp(mismatch).mean()


def generator_loss(fake: torch.Tensor, kind: str) -> torch.Tensor:
    """G's loss from D's logits (B,) on its samples: hinge ``-D`` or non-saturating ``softplus(-D)``."""
    return -fake.mean() if kind == "hinge" else F.softplus(-fake).mean()


def touch_all(loss: torch.Tensor, *modules: torch.nn.Module) -> torch.Tensor:
    """``loss + 0 * sum(params of modules)``: the value and gradients are unchanged.

    Each backward then reaches every parameter, as DDP with ``find_unused_parameters=False`` (the
    default of Lightning's and Ray's DDP strategies) requires of every backward; without it the D
    step (G unused) or the G step (text encoder unused) fails under DDP.
    """
    return loss + 0.0 * sum(p.sum() for m in modules for p in m.parameters() if p.requires_grad)


def sample_latent(
    n: int, dim: int, generator: torch.Generator, device: torch.device, truncation: float | None = None
) -> torch.Tensor:
    """z (n, dim) ~ N(0, I), or truncated to |z_i| <= truncation by resampling (Brock et al. 2019)."""
    z = torch.randn(n, dim, generator=generator, device=device)
    if truncation is None:
        return z
    for _ in range(64):  # each round keeps ~P(|z|<=t) of the rest; 64 rounds cover t >= 0.05
        outside = z.abs() > truncation
        if not outside.any():
            break
        z = torch.where(outside, torch.randn(n, dim, generator=generator, device=device), z)
    return z.clamp(-truncation, truncation)


class GANModule(GenerativeModule):
    """Conditional GAN family (see the module docstring and ``models/gan.md``)."""

    family = "gan"
    generate_options = {"truncation": float}
    edit_modes = frozenset({"interpolate"})

    def build_nets(self, spec: ModuleSpec) -> None:
        m = spec.model
        self.automatic_optimization = False  # two optimisers, stepped in training_step
        self.generator = Generator(
            m.latent_dim, m.text.dim, spec.image_size, spec.channels, m.base_channels, m.cond_dim
        )
        self.discriminator = ProjectionDiscriminator(
            m.text.dim, spec.image_size, spec.channels, m.base_channels
        )
        self.generator_ema = None
        if m.ema_decay > 0:
            self.generator_ema = copy.deepcopy(self.generator).requires_grad_(False)
        self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))

    # ------------------------------------------------------------------------------- optimisers
    def batch_lr_lambda(self, batch_index: int) -> float:
        """LR multiplier after ``batch_index`` batches, with the schedule read in optimiser steps."""
        tc = self.trainer_cfg
        return warmup_cosine(
            batch_index * (self.model_cfg.d_steps + 1), tc.warmup_steps, tc.max_steps, tc.lr_schedule
        )

    def configure_optimizers(self):
        tc, m = self.trainer_cfg, self.model_cfg
        opt_g = torch.optim.Adam(
            self.generator.parameters(), lr=tc.lr, betas=m.betas, weight_decay=tc.weight_decay
        )
        d_params = list(self.discriminator.parameters()) + list(self.text_encoder.parameters())
        opt_d = torch.optim.Adam(d_params, lr=m.lr_d or tc.lr, betas=m.betas, weight_decay=tc.weight_decay)
        scheds = [torch.optim.lr_scheduler.LambdaLR(o, self.batch_lr_lambda) for o in (opt_g, opt_d)]
        return [opt_g, opt_d], [{"scheduler": s, "interval": "step"} for s in scheds]

    def _clip(self, optimizer) -> None:
        if self.trainer_cfg.grad_clip:
            self.clip_gradients(
                optimizer, gradient_clip_val=self.trainer_cfg.grad_clip, gradient_clip_algorithm="norm"
            )

    # --------------------------------------------------------------------------------- training
    def _d_logits(self, real: torch.Tensor, fake: torch.Tensor, text: torch.Tensor):
        """D's logits (B,) on (real, caption), (fake, caption), (real, wrong caption).

        One feature pass over [real, fake]; the wrong-caption term reuses phi(real).
        """
        phi_real, phi_fake = self.discriminator.features(torch.cat([real, fake])).chunk(2)  # (B, F)
        wrong = text.roll(1, dims=0)  # batches are shuffled, so a neighbour's caption is random
        d = self.discriminator
        return d.score(phi_real, text), d.score(phi_fake, text), d.score(phi_real, wrong)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        m = self.model_cfg
        opt_g, opt_d = self.optimizers()
        sched_g, sched_d = self.lr_schedulers()
        real, captions = batch["image"], batch["caption"]  # (B, C, H, W) in [-1, 1], B captions
        b = real.shape[0]

        text = self.encode_text(captions)[2]  # (B, D); grads reach the encoder via opt_d only
        for i in range(m.d_steps):
            if i > 0:  # the encoder moved with the last D step; its graph is freed
                text = self.encode_text(captions)[2]
            z = torch.randn(b, m.latent_dim, device=self.device)
            with torch.no_grad():
                fake = self.generator(z, text.detach())
            d_real, d_fake, d_wrong = self._d_logits(real, fake, text)
            loss_d = discriminator_loss(d_real, d_fake, d_wrong, m.loss, m.mismatch_weight)
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(touch_all(loss_d, self.generator))
            self._clip(opt_d)
            opt_d.step()

        # G reads the caption features of the last D step, detached: G does not train the encoder.
        text = text.detach()
        z = torch.randn(b, m.latent_dim, device=self.device)
        loss_g = generator_loss(self.discriminator(self.generator(z, text), text), m.loss)
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(touch_all(loss_g, self.text_encoder))
        self._clip(opt_g)
        opt_g.step()
        self._update_ema()
        sched_g.step()
        sched_d.step()

        self.log("train/loss_d", loss_d, prog_bar=True, batch_size=b)
        self.log("train/loss_g", loss_g, prog_bar=True, batch_size=b)
        self.log("train/loss", loss_d.detach() + loss_g.detach(), batch_size=b)
        self.log("train/d_real", d_real.mean(), batch_size=b)  # D's mean logits: who is winning
        self.log("train/d_fake", d_fake.mean(), batch_size=b)

    def _update_ema(self) -> None:
        if self.generator_ema is not None:
            ema_update([(self.generator_ema, self.generator)], self.ema_updates, self.model_cfg.ema_decay)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        m = self.model_cfg
        real, captions = valid_rows(batch)
        if not captions:
            return None
        text = self.encode_text(captions)[2]
        g = make_generator(batch_idx, self.device)  # the same latents at every validation
        z = torch.randn(real.shape[0], m.latent_dim, generator=g, device=self.device)
        fake = self.generator(z, text)
        d_real, d_fake, d_wrong = self._d_logits(real, fake, text)
        loss = discriminator_loss(d_real, d_fake, d_wrong, m.loss, m.mismatch_weight)
        b = real.shape[0]
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=b)
        self.log("val/loss_g", generator_loss(d_fake, m.loss), sync_dist=True, batch_size=b)
        return loss

    # ------------------------------------------------------------------------------- generation
    def _truncation(self, truncation: float | None) -> float | None:
        """The ``|z_i|`` bound: the option, else ``model.truncation`` (None: no truncation); checked."""
        t = self.model_cfg.truncation if truncation is None else truncation
        if t is not None and not t > 0:
            raise ValueError(f"truncation must be > 0 (or None for no truncation), got {t!r}")
        return t

    def _sampling_net(self) -> torch.nn.Module:
        """The generator ``generate`` samples from: the EMA copy, or G itself without one."""
        return self.generator_ema if self.generator_ema is not None else self.generator

    def _generate(
        self, captions: list[str], generator: torch.Generator, truncation: float | None = None
    ) -> torch.Tensor:
        t = self._truncation(truncation)
        text = self.encode_text(captions)[2]  # (N, D)
        z = sample_latent(len(captions), self.model_cfg.latent_dim, generator, self.device, t)
        return self._sampling_net()(z, text)  # (N, C, H, W) in [-1, 1]

    def _interpolate(
        self,
        prompt_a: str,
        prompt_b: str,
        frames: int,
        seed: int,
        seed_b: int,
        truncation: float | None = None,
    ) -> torch.Tensor:
        """Frames (frames, C, H, W) in [-1, 1] (see GenerativeModule.interpolate): slerp of the two
        seeds' (truncated) z, lerp of the two prompts' pooled text features, the EMA generator.

        The end frames are generated alone, from the end points' own z and feature, as ``generate``
        samples one caption: so they are its images bit for bit.
        """
        t = self._truncation(truncation)
        dim = self.model_cfg.latent_dim
        # Each seed's z as generate() draws it for one caption, from a fresh generator.
        za, zb = (
            sample_latent(1, dim, make_generator(s, self.device), self.device, t) for s in (seed, seed_b)
        )
        pa, pb = (self.encode_text([p])[2] for p in (prompt_a, prompt_b))  # (1, D) each
        return latent_walk(self._sampling_net(), (za, zb), (pa, pb), frames)

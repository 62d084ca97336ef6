"""The noise scheduler: a small object shared by diffusion training and sampling (diffusers style).

Forward process (Ho et al. 2020, "Denoising Diffusion Probabilistic Models")::

    q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I)
    q(x_t | x_0)     = N(sqrt(abar_t) x_0, (1 - abar_t) I),   abar_t = prod_{s<=t} (1 - beta_s)

Training draws ``t`` and ``noise`` and calls :meth:`NoiseScheduler.add_noise`; the network predicts
either the noise ``eps`` or the velocity ``v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0`` (Salimans &
Ho 2022, "Progressive Distillation"), see :meth:`NoiseScheduler.target`. Sampling calls
:meth:`NoiseScheduler.set_timesteps` and then :meth:`NoiseScheduler.step` once per timestep, with
either the DDPM ancestral update (posterior ``q(x_{t'} | x_t, x_0)``) or the DDIM update (Song et
al. 2021, "Denoising Diffusion Implicit Models"; ``eta=0`` is deterministic).

Timesteps are indexed ``0 .. T-1`` with ``abar[0] = 1 - beta[0]``; "before the first step" is the
clean image, ``abar[-1] := 1``. Buffers are float32 on the CPU and are moved to the sample's device
on use, so nothing changes under mixed precision (bf16 autocast never touches them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

BetaSchedule = Literal["linear", "cosine"]
Prediction = Literal["epsilon", "v"]
Sampler = Literal["ddim", "ddpm"]


def linear_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Ho et al.'s linear schedule, float64 ``(T,)``.

    The endpoints are given for T=1000 and scaled by 1000/T (Nichol & Dhariwal 2021) so that a
    shorter chain still ends at almost pure noise.
    """
    scale = 1000.0 / num_timesteps
    return torch.linspace(
        beta_start * scale, min(beta_end * scale, 0.999), num_timesteps, dtype=torch.float64
    )


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal 2021 ("Improved DDPM"): ``abar(t) = f(t)/f(0)``,
    ``f(t) = cos^2((t/T + s)/(1 + s) pi/2)``.

    ``beta_i = 1 - abar((i+1)/T) / abar(i/T)``, clipped at ``max_beta`` so the last step stays finite.
    """

    def f(u: torch.Tensor) -> torch.Tensor:
        return torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    u = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps  # (T+1,)
    abar = f(u) / f(torch.zeros((), dtype=torch.float64))
    return (1 - abar[1:] / abar[:-1]).clamp(max=max_beta)


def _gather(table: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``table[t]`` for timesteps ``t (B,)``: a float64 CPU table is indexed on the CPU, so
    coefficients such as ``1 - abar_t / abar_{t-1}`` keep their digits before any cast."""
    return table[t.detach().cpu().long()]


def _col(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample coefficients ``(B,)`` -> ``(B, 1, 1, 1)`` in ``like``'s dtype and device."""
    return values.reshape(-1, *([1] * (like.dim() - 1))).to(device=like.device, dtype=like.dtype)


@dataclass
class StepOutput:
    """One sampling step: ``prev_sample`` is x at the previous timestep, ``pred_x0`` the clean estimate."""

    prev_sample: torch.Tensor
    pred_x0: torch.Tensor


class NoiseScheduler:
    """Beta schedule, forward noising, prediction conversions and the DDPM / DDIM reverse steps."""

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_schedule: BetaSchedule = "linear",
        prediction: Prediction = "epsilon",
        clip_sample: bool = True,
    ):
        if num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {num_train_timesteps}")
        if beta_schedule == "linear":
            betas = linear_betas(num_train_timesteps)
        elif beta_schedule == "cosine":
            betas = cosine_betas(num_train_timesteps)
        else:
            raise ValueError(f"unknown beta_schedule {beta_schedule!r}; allowed: linear, cosine")
        if prediction not in ("epsilon", "v"):
            raise ValueError(f"unknown prediction {prediction!r}; allowed: epsilon, v")
        self.num_train_timesteps = num_train_timesteps
        self.beta_schedule = beta_schedule
        self.prediction = prediction
        self.clip_sample = clip_sample
        # Computed in float64, stored float32: the products of 1000 factors lose digits in float32.
        self.betas = betas.float()  # (T,)
        self.alphas = (1 - betas).float()  # (T,)
        self.alphas_cumprod = torch.cumprod(1 - betas, dim=0).float()  # (T,) abar_t
        self._abar = torch.cumprod(1 - betas, dim=0)  # float64 (T,): what the formulas index
        self._abar_padded = torch.cat([torch.ones(1, dtype=torch.float64), self._abar])  # abar[-1] = 1
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1)  # sampling order, descending

    # ------------------------------------------------------------------------------ training side
    def sample_timesteps(
        self, batch: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """Uniform training timesteps ``(B,)`` in ``[0, T)``."""
        return torch.randint(0, self.num_train_timesteps, (batch,), generator=generator, device=device)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """A sample of ``q(x_t | x_0)``: ``sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``, ``(B, C, H, W)``."""
        ab = _gather(self._abar, t)
        return _col(ab.sqrt(), x0) * x0 + _col((1 - ab).sqrt(), x0) * noise

    def velocity(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0`` (Salimans & Ho 2022)."""
        ab = _gather(self._abar, t)
        return _col(ab.sqrt(), x0) * noise - _col((1 - ab).sqrt(), x0) * x0

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network is trained to output: ``noise`` (epsilon) or the velocity (v)."""
        return noise if self.prediction == "epsilon" else self.velocity(x0, noise, t)

    # ------------------------------------------------------------------------------ conversions
    def predict_x0(self, x_t: torch.Tensor, model_output: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Clean-image estimate from the network output (not clipped)."""
        ab = _gather(self._abar, t)
        if self.prediction == "epsilon":
            return (x_t - _col((1 - ab).sqrt(), x_t) * model_output) * _col(ab.rsqrt(), x_t)
        return _col(ab.sqrt(), x_t) * x_t - _col((1 - ab).sqrt(), x_t) * model_output

    def predict_eps(self, x_t: torch.Tensor, model_output: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Noise estimate from the network output."""
        if self.prediction == "epsilon":
            return model_output
        ab = _gather(self._abar, t)
        return _col((1 - ab).sqrt(), x_t) * x_t + _col(ab.sqrt(), x_t) * model_output

    def eps_from_x0(self, x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The noise consistent with ``x_t`` and a (clipped) ``x0``: (x_t - sqrt(abar) x0) / sqrt(1-abar)."""
        ab = _gather(self._abar, t)
        return (x_t - _col(ab.sqrt(), x_t) * x0) * _col((1 - ab).rsqrt(), x_t)

    # ------------------------------------------------------------------------------ posterior
    def _jump(self, t: torch.Tensor, t_prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """float64 ``(abar_t, abar_prev, beta)`` of the jump ``t -> t_prev`` (-1: the clean image)."""
        ab_t = _gather(self._abar, t)
        ab_prev = _gather(self._abar_padded, t_prev.detach().cpu().long() + 1)
        return ab_t, ab_prev, 1 - ab_t / ab_prev

    def posterior(
        self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of ``q(x_{t_prev} | x_t, x_0)``; ``t_prev`` defaults to ``t - 1``.

        With ``abar' = abar_{t_prev}`` and the effective ``beta = 1 - abar_t / abar'`` of the jump::

            mean = sqrt(abar') beta / (1 - abar_t) x0 + sqrt(1 - beta) (1 - abar') / (1 - abar_t) x_t
            var  = (1 - abar') / (1 - abar_t) beta

        which for ``t_prev = t - 1`` is Ho et al.'s ``mu~_t`` and ``beta~_t`` (their eq. 7).
        """
        t = t.long()
        ab_t, ab_prev, beta = self._jump(t, t - 1 if t_prev is None else t_prev.long())
        coef_x0 = ab_prev.sqrt() * beta / (1 - ab_t)
        coef_xt = (1 - beta).sqrt() * (1 - ab_prev) / (1 - ab_t)
        mean = _col(coef_x0, x_t) * x0 + _col(coef_xt, x_t) * x_t
        return mean, _col((1 - ab_prev) / (1 - ab_t) * beta, x_t)

    # ------------------------------------------------------------------------------ sampling side
    def set_timesteps(self, num_steps: int) -> torch.Tensor:
        """Choose ``num_steps`` sampling timesteps, evenly spaced from T-1 down to 0 (descending).

        Starting at T-1 ("trailing" spacing, Lin et al. 2024) makes a few-step sampler begin from
        the same almost-pure noise the model was trained on.
        """
        if not 1 <= num_steps <= self.num_train_timesteps:
            raise ValueError(f"steps must be in 1..{self.num_train_timesteps}, got {num_steps}")
        if num_steps == 1:
            self.timesteps = torch.tensor([self.num_train_timesteps - 1])
        else:
            grid = torch.linspace(self.num_train_timesteps - 1, 0, num_steps, dtype=torch.float64)
            self.timesteps = grid.round().long()
        return self.timesteps

    def previous_timestep(self, t: int) -> int:
        """The timestep after ``t`` in the current sampling order; -1 after the last."""
        ts = self.timesteps.tolist()
        if t not in ts:
            raise ValueError(f"timestep {t} is not in the current schedule; call set_timesteps first")
        i = ts.index(t)
        return ts[i + 1] if i + 1 < len(ts) else -1

    def step(
        self,
        model_output: torch.Tensor,
        t: int,
        x_t: torch.Tensor,
        sampler: Sampler = "ddim",
        eta: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> StepOutput:
        """One reverse step from ``t`` to the previous timestep of :meth:`set_timesteps`.

        ``x0`` is estimated from the network output, clipped to [-1, 1] (when ``clip_sample``), and
        the noise is re-derived from the clipped ``x0`` so that the two stay consistent.

        - ``ddpm``: ancestral sample from the posterior ``q(x_{t'} | x_t, x0)`` (noise unless t' = -1);
        - ``ddim``: ``x_{t'} = sqrt(abar') x0 + sqrt(1 - abar' - sigma^2) eps + sigma z`` with
          ``sigma = eta sqrt((1-abar')/(1-abar_t) (1 - abar_t/abar'))``; ``eta=0`` is deterministic.

        All noise comes from ``generator`` (on ``x_t``'s device).
        """
        if sampler not in ("ddim", "ddpm"):
            raise ValueError(f"unknown sampler {sampler!r}; allowed: ddim, ddpm")
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        b = x_t.shape[0]
        t_prev = self.previous_timestep(int(t))
        tt = torch.full((b,), int(t), dtype=torch.long, device=x_t.device)
        tp = torch.full((b,), t_prev, dtype=torch.long, device=x_t.device)

        # Under autocast the network may return bf16; the update runs in float32.
        x_t32, out32 = x_t.float(), model_output.float()
        x0 = self.predict_x0(x_t32, out32, tt)
        if self.clip_sample:
            x0 = x0.clamp(-1.0, 1.0)
        eps = self.eps_from_x0(x_t32, x0, tt)

        if sampler == "ddpm":
            mean, var = self.posterior(x0, x_t32, tt, tp)
            if t_prev < 0:
                return StepOutput(mean, x0)
            z = torch.randn(x_t32.shape, generator=generator, device=x_t.device, dtype=torch.float32)
            return StepOutput(mean + var.sqrt() * z, x0)

        ab_t, ab_prev, beta = self._jump(tt, tp)
        sigma = eta * ((1 - ab_prev) / (1 - ab_t) * beta).clamp(min=0).sqrt()  # float64 (B,)
        dir_coef = (1 - ab_prev - sigma**2).clamp(min=0).sqrt()
        prev = _col(ab_prev.sqrt(), x_t32) * x0 + _col(dir_coef, x_t32) * eps
        sigma = _col(sigma, x_t32)
        if eta > 0 and t_prev >= 0:
            z = torch.randn(x_t32.shape, generator=generator, device=x_t.device, dtype=torch.float32)
            prev = prev + sigma * z
        return StepOutput(prev, x0)

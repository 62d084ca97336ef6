"""Noise schedulers shared by diffusion training and sampling (diffusers style: one class per sampler).

Forward process (Ho et al. 2020, "Denoising Diffusion Probabilistic Models")::

    q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I)
    q(x_t | x_0)     = N(sqrt(abar_t) x_0, (1 - abar_t) I),   abar_t = prod_{s<=t} (1 - beta_s)

:class:`DiffusionScheduler` holds what training and every sampler share: the beta schedule, forward
noising (:meth:`~DiffusionScheduler.add_noise`), the training target (the noise ``eps`` or the
velocity ``v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0``, Salimans & Ho 2022, "Progressive
Distillation"), the conversions between the network output, ``x_0`` and ``eps``, the posterior
``q(x_{t'} | x_t, x_0)`` and the sampling timesteps. Each sampler is a subclass with its own
``step``, as diffusers has ``DDPMScheduler`` and ``DDIMScheduler``:

- :class:`DDPMScheduler`: ancestral sampling from the posterior (Ho et al. 2020);
- :class:`DDIMScheduler`: the DDIM update (Song et al. 2021, "Denoising Diffusion Implicit
  Models"), deterministic at ``eta=0``.

A sampler's name (``model.sampler``, ``generate(sampler=...)``) is turned into its class in one
place, :data:`SCHEDULERS` (read through :func:`scheduler_class`). Training uses the configured
sampler's class too: the training side is the base class's and the same in both.

Timesteps are indexed ``0 .. T-1`` with ``abar[0] = 1 - beta[0]``; "before the first step" is the
clean image, ``abar[-1] := 1``. Buffers are float32 on the CPU and are moved to the sample's device
on use, so nothing changes under mixed precision (bf16 autocast never touches them).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal

import torch

BetaSchedule = Literal["linear", "cosine"]
Prediction = Literal["epsilon", "v"]


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


class DiffusionScheduler(ABC):
    """What training and every sampler share: the beta schedule, forward noising, the training
    target, the conversions between network output, ``x_0`` and ``eps``, the posterior and the
    sampling timesteps. A subclass adds its reverse update, :meth:`step`.

    The arguments are the model config's ``timesteps``, ``beta_schedule`` and ``prediction``;
    ``clip_sample`` clips ``x_0`` estimates to the pixel range [-1, 1] while sampling (off for
    latents, which have no such range).
    """

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

    def _estimate(self, model_output: torch.Tensor, t: int, x_t: torch.Tensor) -> _Estimate:
        """What every reverse step from ``t`` starts from (see :class:`_Estimate`).

        ``x0`` is estimated from the network output and clipped to [-1, 1] (when ``clip_sample``);
        the noise is then re-derived from the clipped ``x0`` so that the two stay consistent
        (otherwise a clipped step would move ``x`` along noise that no longer explains ``x_t``).
        """
        b = x_t.shape[0]
        t_prev = self.previous_timestep(int(t))
        tt = torch.full((b,), int(t), dtype=torch.long, device=x_t.device)
        tp = torch.full((b,), t_prev, dtype=torch.long, device=x_t.device)
        # Under autocast the network may return bf16; the update runs in float32.
        x_t32, out32 = x_t.float(), model_output.float()
        x0 = self.predict_x0(x_t32, out32, tt)
        if self.clip_sample:
            x0 = x0.clamp(-1.0, 1.0)
        return _Estimate(x_t32, x0, self.eps_from_x0(x_t32, x0, tt), tt, tp, final=t_prev < 0)

    @abstractmethod
    def step(
        self,
        model_output: torch.Tensor,
        t: int,
        x_t: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
    ) -> StepOutput:
        """One reverse step of ``x_t (B, C, H, W)`` from ``t`` to the previous timestep of
        :meth:`set_timesteps`, from the network output at ``t``; all noise comes from ``generator``
        (on ``x_t``'s device). Returns float32 tensors."""


@dataclass
class _Estimate:
    """The start of a reverse step from ``t``: float32 on ``x_t``'s device, ``(B, C, H, W)`` images."""

    x_t: torch.Tensor  # the current sample, float32
    x0: torch.Tensor  # clean estimate, clipped when the scheduler clips
    eps: torch.Tensor  # the noise consistent with x_t and the (clipped) x0
    t: torch.Tensor  # (B,) long, the current timestep
    t_prev: torch.Tensor  # (B,) long, the timestep stepped to; -1 is the clean image
    final: bool  # this step lands on the clean image (t_prev = -1): no noise is added


class DDPMScheduler(DiffusionScheduler):
    """Ancestral sampling (Ho et al. 2020, Algorithm 2, generalised to a strided schedule).

    ``x_{t'} ~ q(x_{t'} | x_t, x0) = N(mean, var)`` of :meth:`DiffusionScheduler.posterior`, with
    the effective ``beta = 1 - abar_t / abar_{t'}`` of the jump ``t -> t'``; the last step (to the
    clean image, ``t' = -1``) returns the mean, which is then ``x0`` itself (``var = 0``).
    """

    def step(
        self,
        model_output: torch.Tensor,
        t: int,
        x_t: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
    ) -> StepOutput:
        e = self._estimate(model_output, t, x_t)
        mean, var = self.posterior(e.x0, e.x_t, e.t, e.t_prev)  # (B, C, H, W), (B, 1, 1, 1)
        if e.final:
            return StepOutput(mean, e.x0)
        z = torch.randn(e.x_t.shape, generator=generator, device=x_t.device, dtype=torch.float32)
        return StepOutput(mean + var.sqrt() * z, e.x0)


class DDIMScheduler(DiffusionScheduler):
    """The DDIM update (Song et al. 2021, eq. 12), with ``abar' = abar_{t'}``::

        x_{t'} = sqrt(abar') x0 + sqrt(1 - abar' - sigma^2) eps + sigma z
        sigma  = eta sqrt((1 - abar') / (1 - abar_t) (1 - abar_t / abar'))       (their eq. 16)

    ``eta = 0`` is deterministic (the probability-flow-like implicit sampler, no noise drawn);
    ``eta = 1`` is the DDPM ancestral step in distribution (``sigma^2`` is the posterior variance).
    """

    def step(
        self,
        model_output: torch.Tensor,
        t: int,
        x_t: torch.Tensor,
        *,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> StepOutput:
        """:meth:`DiffusionScheduler.step` with the noise scale ``eta >= 0`` (diffusers' argument)."""
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        e = self._estimate(model_output, t, x_t)
        ab_t, ab_prev, beta = self._jump(e.t, e.t_prev)  # float64 (B,) each
        sigma = eta * ((1 - ab_prev) / (1 - ab_t) * beta).clamp(min=0).sqrt()  # float64 (B,)
        dir_coef = (1 - ab_prev - sigma**2).clamp(min=0).sqrt()  # "direction pointing to x_t"
        prev = _col(ab_prev.sqrt(), e.x_t) * e.x0 + _col(dir_coef, e.x_t) * e.eps
        if eta > 0 and not e.final:  # eta = 0 draws nothing, so seeded samples do not shift
            z = torch.randn(e.x_t.shape, generator=generator, device=x_t.device, dtype=torch.float32)
            prev = prev + _col(sigma, e.x_t) * z
        return StepOutput(prev, e.x0)


#: The one mapping from a sampler's name (``model.sampler``, ``generate(sampler=...)``) to its class;
#: aigc.config's ``DiffusionConfig.sampler`` lists the same names for validation without torch.
SCHEDULERS: dict[str, type[DiffusionScheduler]] = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}


def scheduler_class(sampler: str) -> type[DiffusionScheduler]:
    """The scheduler class of a sampler name; an unknown name is an error listing the known ones."""
    try:
        return SCHEDULERS[sampler]
    except (KeyError, TypeError):
        raise ValueError(f"unknown sampler {sampler!r}; allowed: {', '.join(SCHEDULERS)}") from None

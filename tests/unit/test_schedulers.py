"""The noise schedulers against the closed forms of DDPM (Ho et al. 2020), DDIM (Song et al. 2021),
the cosine schedule (Nichol & Dhariwal 2021) and v-prediction (Salimans & Ho 2022).

Training-side maths (shared by every scheduler class) is tested through :class:`DDPMScheduler`;
each class's ``step`` is checked against its paper's update computed here in float64."""

from __future__ import annotations

import math
from typing import get_args

import pytest
import torch

from aigc.config import DiffusionConfig
from aigc.models.schedulers import (
    SCHEDULERS,
    DDIMScheduler,
    DDPMScheduler,
    DiffusionScheduler,
    cosine_betas,
    linear_betas,
    scheduler_class,
)

T = 1000


@pytest.fixture(params=["linear", "cosine"])
def schedule(request: pytest.FixtureRequest) -> str:
    return request.param


def _x0(shape=(4, 1, 3, 3), seed: int = 0) -> torch.Tensor:
    """Clean images inside [-1, 1] (so clipping never changes them)."""
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 1.8 - 0.9


def test_alphas_cumprod_is_the_product_of_one_minus_beta(schedule: str) -> None:
    s = DDPMScheduler(T, schedule)
    betas = s.betas.double()
    expected = torch.tensor(
        [math.prod(1 - b for b in betas[: t + 1].tolist()) for t in range(0, T, 97)], dtype=torch.float64
    )
    assert torch.allclose(s.alphas_cumprod[::97].double(), expected, rtol=1e-4, atol=1e-9)
    assert torch.all(s.betas > 0) and torch.all(s.betas < 1)
    assert torch.all(s.alphas_cumprod[1:] < s.alphas_cumprod[:-1])  # strictly more noise over time
    for buf in (s.betas, s.alphas, s.alphas_cumprod):
        assert buf.dtype == torch.float32


def test_linear_schedule_endpoints_and_scaling() -> None:
    b = linear_betas(1000)
    assert b[0].item() == pytest.approx(1e-4) and b[-1].item() == pytest.approx(0.02)
    short = linear_betas(100)  # scaled by 1000/T so a short chain still ends near pure noise
    assert short[0].item() == pytest.approx(1e-3) and short[-1].item() == pytest.approx(0.2)
    assert DDPMScheduler(100, "linear").alphas_cumprod[-1] < 1e-3


def test_cosine_schedule_matches_closed_form_and_endpoints() -> None:
    s = DDPMScheduler(T, "cosine")

    def f(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    # abar_t = f((t+1)/T) / f(0) wherever beta is not clipped (everywhere but the very end).
    for t in (0, 1, 10, 250, 500, 750, 900, 990):
        assert s.alphas_cumprod[t].item() == pytest.approx(f((t + 1) / T) / f(0), rel=1e-4, abs=1e-7)
    assert s.alphas_cumprod[0].item() > 0.9999  # starts at the clean image
    assert s.alphas_cumprod[-1].item() < 1e-6  # ends at pure noise
    assert cosine_betas(T).max().item() == pytest.approx(0.999)  # clipped, finite
    assert torch.all(s.betas[1:] >= s.betas[:-1])


@pytest.mark.parametrize("t", [0, 100, 500, 999])
def test_add_noise_has_the_moments_of_q_xt_given_x0(schedule: str, t: int) -> None:
    s = DDPMScheduler(T, schedule)
    n = 200_000
    x0 = torch.tensor([-0.8, 0.0, 0.3, 1.0]).reshape(1, 4, 1, 1).expand(n, 4, 1, 1)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(t))
    xt = s.add_noise(x0, noise, torch.full((n,), t))
    abar = s.alphas_cumprod[t].item()
    mean, var = xt.mean(0).flatten(), xt.var(0).flatten()
    tol = 5 * math.sqrt((1 - abar) / n)
    assert torch.allclose(mean, math.sqrt(abar) * x0[0].flatten(), atol=tol)
    assert torch.allclose(var, torch.full((4,), 1 - abar), rtol=0.02, atol=1e-6)


def test_posterior_matches_ho_et_al_and_gaussian_conditioning(schedule: str) -> None:
    s = DDPMScheduler(T, schedule)
    x0, xt = _x0(seed=1), torch.randn(4, 1, 3, 3, generator=torch.Generator().manual_seed(2))
    b = linear_betas(T) if schedule == "linear" else cosine_betas(T)  # float64 reference
    ab = torch.cumprod(1 - b, 0)
    assert torch.allclose(s.betas, b.float()) and torch.allclose(s.alphas_cumprod, ab.float())
    for t in (1, 10, 400, 998):
        mean, var = s.posterior(x0, xt, torch.full((4,), t))
        # Ho et al. eq. 7: mu~ = sqrt(abar_{t-1}) beta_t / (1 - abar_t) x0
        #                  + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) x_t
        c0 = math.sqrt(ab[t - 1]) * b[t] / (1 - ab[t])
        ct = math.sqrt(1 - b[t]) * (1 - ab[t - 1]) / (1 - ab[t])
        beta_tilde = (1 - ab[t - 1]) / (1 - ab[t]) * b[t]
        assert torch.allclose(mean, (c0 * x0 + ct * xt).float(), rtol=1e-4, atol=1e-5)
        assert var.flatten()[0].item() == pytest.approx(beta_tilde.item(), rel=1e-4)
        # The same from conditioning the joint Gaussian of (x_{t-1}, x_t) given x0.
        cov = math.sqrt(1 - b[t]) * (1 - ab[t - 1])
        m_prev = math.sqrt(ab[t - 1]) * x0.double()
        cond_mean = m_prev + cov / (1 - ab[t]) * (xt.double() - math.sqrt(ab[t]) * x0.double())
        cond_var = (1 - ab[t - 1]) - cov**2 / (1 - ab[t])
        assert torch.allclose(mean.double(), cond_mean, rtol=1e-4, atol=1e-5)
        assert var.flatten()[0].item() == pytest.approx(cond_var.item(), rel=1e-3)
    # t = 0 steps to the clean image itself.
    mean0, var0 = s.posterior(x0, xt, torch.zeros(4, dtype=torch.long))
    assert torch.allclose(mean0, x0, atol=1e-6) and torch.all(var0 == 0)


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_prediction_conversions_invert_each_other(schedule: str, prediction: str) -> None:
    s = DDPMScheduler(T, schedule, prediction)
    x0 = _x0((8, 3, 4, 4))
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([0, 1, 50, 300, 500, 700, 900, 998])
    xt = s.add_noise(x0, eps, t)
    out = s.target(x0, eps, t)
    assert torch.equal(out, eps) if prediction == "epsilon" else not torch.allclose(out, eps)
    assert torch.allclose(s.predict_x0(xt, out, t), x0, atol=2e-3)
    assert torch.allclose(s.predict_eps(xt, out, t), eps, atol=2e-3)
    assert torch.allclose(s.eps_from_x0(xt, x0, t), eps, atol=2e-3)
    # v = sqrt(abar) eps - sqrt(1 - abar) x0, checked directly.
    ab = s.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    assert torch.allclose(s.velocity(x0, eps, t), ab.sqrt() * eps - (1 - ab).sqrt() * x0, atol=1e-6)


@pytest.mark.parametrize("n", [1, 2, 7, 25, 50, T])
def test_set_timesteps_descends_from_t_minus_1_to_0(n: int) -> None:
    s = DDPMScheduler(T)
    ts = s.set_timesteps(n)
    assert len(ts) == n and len(set(ts.tolist())) == n
    assert ts[0].item() == T - 1 and (n == 1 or ts[-1].item() == 0)
    assert torch.all(ts[1:] < ts[:-1])
    assert s.previous_timestep(int(ts[-1])) == -1


def test_set_timesteps_rejects_bad_counts() -> None:
    s = DDIMScheduler(T)
    for bad in (0, T + 1):
        with pytest.raises(ValueError, match=f"steps must be in 1..{T}"):
            s.set_timesteps(bad)
    s.set_timesteps(10)
    with pytest.raises(ValueError, match="not in the current schedule"):
        s.step(torch.zeros(1, 1, 2, 2), 500, torch.zeros(1, 1, 2, 2))


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_ddim_eta0_with_the_exact_noise_recovers_x0(schedule: str, prediction: str) -> None:
    s = DDIMScheduler(T, schedule, prediction)
    x0 = _x0()
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(4))
    s.set_timesteps(10)
    for t in s.timesteps.tolist():
        tt = torch.full((4,), t)
        xt = s.add_noise(x0, eps, tt)
        step = s.step(s.target(x0, eps, tt), t, xt, eta=0.0)
        assert torch.allclose(step.pred_x0, x0, atol=5e-3)
        # DDIM is deterministic: the previous sample lies on the same (x0, eps) line.
        t_prev = s.previous_timestep(t)
        expected = x0 if t_prev < 0 else s.add_noise(x0, eps, torch.full((4,), t_prev))
        assert torch.allclose(step.prev_sample, expected, atol=5e-3)


def test_full_ddim_chain_with_an_oracle_ends_at_x0(schedule: str) -> None:
    s = DDIMScheduler(T, schedule, "epsilon")
    x0 = _x0()
    x = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
    s.set_timesteps(20)
    for t in s.timesteps.tolist():
        tt = torch.full((4,), t)
        oracle_eps = s.eps_from_x0(x, x0, tt)  # the noise that makes x0 the right answer
        x = s.step(oracle_eps, t, x).prev_sample
    assert torch.allclose(x, x0, atol=1e-4)


def test_ddim_with_eta_1_is_the_ddpm_ancestral_step(schedule: str) -> None:
    ddpm_s, ddim_s = DDPMScheduler(T, schedule), DDIMScheduler(T, schedule)
    x0 = _x0()
    xt = torch.randn(x0.shape, generator=torch.Generator().manual_seed(6))
    for n in (T, 13):
        ddpm_s.set_timesteps(n)
        ddim_s.set_timesteps(n)
        t = int(ddpm_s.timesteps[3])
        out = ddpm_s.eps_from_x0(xt, x0, torch.full((4,), t))
        ddpm = ddpm_s.step(out, t, xt, generator=torch.Generator().manual_seed(7)).prev_sample
        ddim = ddim_s.step(out, t, xt, eta=1.0, generator=torch.Generator().manual_seed(7))
        assert torch.allclose(ddpm, ddim.prev_sample, atol=1e-5)


def test_ddpm_step_samples_the_posterior(schedule: str) -> None:
    s = DDPMScheduler(T, schedule)
    s.set_timesteps(T)
    n, t = 100_000, 300
    x0 = _x0((1, 1, 1, 2)).expand(n, 1, 1, 2)
    xt = torch.tensor([0.5, -1.5]).reshape(1, 1, 1, 2).expand(n, 1, 1, 2)
    tt = torch.full((n,), t)
    out = s.eps_from_x0(xt, x0, tt)
    prev = s.step(out, t, xt, generator=torch.Generator().manual_seed(8)).prev_sample
    mean, var = s.posterior(x0[:1], xt[:1], tt[:1])
    assert torch.allclose(prev.mean(0), mean[0], atol=5 * var.sqrt().max().item() / math.sqrt(n))
    assert torch.allclose(prev.var(0), var[0].expand(1, 1, 2), rtol=0.03)


def test_step_clips_x0_and_rederives_eps() -> None:
    s = DDIMScheduler(T, "linear", "epsilon")
    s.set_timesteps(10)
    t = int(s.timesteps[5])
    tt = torch.full((1,), t)
    xt = torch.full((1, 1, 1, 1), 3.0)
    out = torch.full((1, 1, 1, 1), -4.0)  # implies x0 far above 1
    assert s.predict_x0(xt, out, tt).item() > 1.5
    step = s.step(out, t, xt)
    assert step.pred_x0.item() == 1.0
    ab, ab_prev = s.alphas_cumprod[t], s.alphas_cumprod[s.previous_timestep(t)]
    eps = (xt - ab.sqrt() * 1.0) / (1 - ab).sqrt()  # consistent with the clipped x0, not the raw output
    assert step.prev_sample.item() == pytest.approx(
        (ab_prev.sqrt() + (1 - ab_prev).sqrt() * eps).item(), rel=1e-5
    )
    unclipped = DDIMScheduler(T, "linear", "epsilon", clip_sample=False)
    unclipped.set_timesteps(10)
    assert unclipped.step(out, t, xt).pred_x0.item() > 1.5


def test_randomness_comes_from_the_generator_and_steps_run_in_float32() -> None:
    x_t = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    out = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1)).bfloat16()

    def run(seed: int, sampler: str, **kwargs: float) -> torch.Tensor:
        s = SCHEDULERS[sampler](T, "cosine", "v")
        t = int(s.set_timesteps(5)[1])
        return s.step(out, t, x_t, generator=torch.Generator().manual_seed(seed), **kwargs).prev_sample

    for sampler, kwargs in (("ddpm", {}), ("ddim", {"eta": 0.5})):
        a = run(0, sampler, **kwargs)
        assert a.dtype == torch.float32
        assert torch.equal(a, run(0, sampler, **kwargs))
        assert not torch.allclose(a, run(1, sampler, **kwargs))
    assert torch.equal(run(0, "ddim"), run(1, "ddim"))  # eta = 0 draws nothing


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="beta_schedule"):
        DDIMScheduler(T, "quadratic")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="prediction"):
        DDPMScheduler(T, "linear", "x0")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_train_timesteps"):
        DDIMScheduler(1)
    s = DDIMScheduler(T)
    s.set_timesteps(4)
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match="eta"):
        s.step(x, T - 1, x, eta=-1.0)
    with pytest.raises(ValueError, match="unknown sampler 'euler'; allowed: ddim, ddpm"):
        scheduler_class("euler")


# ------------------------------------------------------------------ one class per sampler, one map
def test_the_sampler_names_of_the_config_are_the_mapping_s() -> None:
    """model.sampler (validated without torch) and SCHEDULERS name the same samplers."""
    assert set(get_args(DiffusionConfig.model_fields["sampler"].annotation)) == set(SCHEDULERS)
    assert {"ddim": DDIMScheduler, "ddpm": DDPMScheduler} == SCHEDULERS
    for name, cls in SCHEDULERS.items():
        assert scheduler_class(name) is cls and issubclass(cls, DiffusionScheduler)


def test_every_scheduler_shares_the_training_side(schedule: str) -> None:
    """Training does not depend on the sampler: the schedule and forward maths are the base's."""
    x0, t = _x0(), torch.tensor([0, 10, 500, 999])
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(11))
    ddpm, ddim = DDPMScheduler(T, schedule, "v"), DDIMScheduler(T, schedule, "v")
    assert torch.equal(ddpm.alphas_cumprod, ddim.alphas_cumprod)
    assert torch.equal(ddpm.add_noise(x0, eps, t), ddim.add_noise(x0, eps, t))
    assert torch.equal(ddpm.target(x0, eps, t), ddim.target(x0, eps, t))


def _abar64(schedule: str) -> torch.Tensor:
    """abar_t in float64 from the betas, with abar[-1] = 1 appended last (index -1)."""
    b = linear_betas(T) if schedule == "linear" else cosine_betas(T)
    return torch.cat([torch.cumprod(1 - b, 0), torch.ones(1, dtype=torch.float64)])


@pytest.mark.parametrize("steps", [T, 13])
def test_ddpm_step_is_the_closed_form_posterior_sample(schedule: str, steps: int) -> None:
    """x_{t'} = mu~ + sqrt(beta~) z with the same z (Ho et al. 2020, eq. 7 with the effective
    beta = 1 - abar_t / abar_{t'} of a strided jump); the last step returns x0 itself."""
    s = DDPMScheduler(T, schedule, "epsilon")
    ts = s.set_timesteps(steps).tolist()
    ab = _abar64(schedule)
    x0 = _x0(seed=12).double()
    x_t = torch.randn(x0.shape, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    for t, t_prev in zip(ts, [*ts[1:], -1], strict=True):
        eps = (x_t - ab[t].sqrt() * x0) / (1 - ab[t]).sqrt()  # the output that makes x0 exact
        got = s.step(eps.float(), t, x_t.float(), generator=torch.Generator().manual_seed(t))
        # x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar): float32 rounding of eps grows by 1/sqrt(abar)
        assert torch.allclose(got.pred_x0.double(), x0, atol=1e-4 + 1e-6 / ab[t].sqrt().item())
        if t_prev < 0:
            assert torch.equal(got.prev_sample, got.pred_x0)  # the last step lands on x0, no noise
            continue
        # The posterior around the scheduler's own x0 estimate, so only the update is compared.
        x0_hat, beta = got.pred_x0.double(), 1 - ab[t] / ab[t_prev]
        coef_x0 = ab[t_prev].sqrt() * beta / (1 - ab[t])
        coef_xt = (1 - beta).sqrt() * (1 - ab[t_prev]) / (1 - ab[t])
        z = torch.randn(x0.shape, generator=torch.Generator().manual_seed(t)).double()
        expected = coef_x0 * x0_hat + coef_xt * x_t + ((1 - ab[t_prev]) / (1 - ab[t]) * beta).sqrt() * z
        assert torch.allclose(got.prev_sample.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
def test_ddim_step_is_song_et_al_eq_12(schedule: str, eta: float) -> None:
    """x_{t'} = sqrt(abar') x0 + sqrt(1 - abar' - sigma^2) eps + sigma z, sigma from eq. 16;
    at eta = 0 no noise is drawn: the generator's state is untouched."""
    s = DDIMScheduler(T, schedule, "v")
    ts = s.set_timesteps(9).tolist()
    ab = _abar64(schedule)
    x0 = _x0(seed=14).double()
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(15), dtype=torch.float64)
    for t, t_prev in zip(ts, [*ts[1:], -1], strict=True):
        x_t = ab[t].sqrt() * x0 + (1 - ab[t]).sqrt() * eps
        v = ab[t].sqrt() * eps - (1 - ab[t]).sqrt() * x0  # the network's exact v output
        g = torch.Generator().manual_seed(t)
        state = g.get_state()
        got = s.step(v.float(), t, x_t.float(), eta=eta, generator=g).prev_sample.double()
        sigma = eta * ((1 - ab[t_prev]) / (1 - ab[t]) * (1 - ab[t] / ab[t_prev])).sqrt()
        expected = ab[t_prev].sqrt() * x0 + (1 - ab[t_prev] - sigma**2).clamp(min=0).sqrt() * eps
        if eta > 0 and t_prev >= 0:
            expected = expected + sigma * torch.randn(x0.shape, generator=torch.Generator().manual_seed(t))
        else:
            assert torch.equal(g.get_state(), state)
        assert torch.allclose(got, expected, rtol=1e-4, atol=2e-4)

"""The noise scheduler against the closed forms of DDPM (Ho et al. 2020), DDIM (Song et al. 2021),
the cosine schedule (Nichol & Dhariwal 2021) and v-prediction (Salimans & Ho 2022)."""

from __future__ import annotations

import math

import pytest
import torch

from aigc.models.schedulers import NoiseScheduler, cosine_betas, linear_betas

T = 1000


@pytest.fixture(params=["linear", "cosine"])
def schedule(request: pytest.FixtureRequest) -> str:
    return request.param


def _x0(shape=(4, 1, 3, 3), seed: int = 0) -> torch.Tensor:
    """Clean images inside [-1, 1] (so clipping never changes them)."""
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 1.8 - 0.9


def test_alphas_cumprod_is_the_product_of_one_minus_beta(schedule: str) -> None:
    s = NoiseScheduler(T, schedule)
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
    assert NoiseScheduler(100, "linear").alphas_cumprod[-1] < 1e-3


def test_cosine_schedule_matches_closed_form_and_endpoints() -> None:
    s = NoiseScheduler(T, "cosine")

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
    s = NoiseScheduler(T, schedule)
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
    s = NoiseScheduler(T, schedule)
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
    s = NoiseScheduler(T, schedule, prediction)
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
    s = NoiseScheduler(T)
    ts = s.set_timesteps(n)
    assert len(ts) == n and len(set(ts.tolist())) == n
    assert ts[0].item() == T - 1 and (n == 1 or ts[-1].item() == 0)
    assert torch.all(ts[1:] < ts[:-1])
    assert s.previous_timestep(int(ts[-1])) == -1


def test_set_timesteps_rejects_bad_counts() -> None:
    s = NoiseScheduler(T)
    for bad in (0, T + 1):
        with pytest.raises(ValueError, match=f"steps must be in 1..{T}"):
            s.set_timesteps(bad)
    s.set_timesteps(10)
    with pytest.raises(ValueError, match="not in the current schedule"):
        s.step(torch.zeros(1, 1, 2, 2), 500, torch.zeros(1, 1, 2, 2))


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_ddim_eta0_with_the_exact_noise_recovers_x0(schedule: str, prediction: str) -> None:
    s = NoiseScheduler(T, schedule, prediction)
    x0 = _x0()
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(4))
    s.set_timesteps(10)
    for t in s.timesteps.tolist():
        tt = torch.full((4,), t)
        xt = s.add_noise(x0, eps, tt)
        step = s.step(s.target(x0, eps, tt), t, xt, sampler="ddim", eta=0.0)
        assert torch.allclose(step.pred_x0, x0, atol=5e-3)
        # DDIM is deterministic: the previous sample lies on the same (x0, eps) line.
        t_prev = s.previous_timestep(t)
        expected = x0 if t_prev < 0 else s.add_noise(x0, eps, torch.full((4,), t_prev))
        assert torch.allclose(step.prev_sample, expected, atol=5e-3)


def test_full_ddim_chain_with_an_oracle_ends_at_x0(schedule: str) -> None:
    s = NoiseScheduler(T, schedule, "epsilon")
    x0 = _x0()
    x = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
    s.set_timesteps(20)
    for t in s.timesteps.tolist():
        tt = torch.full((4,), t)
        oracle_eps = s.eps_from_x0(x, x0, tt)  # the noise that makes x0 the right answer
        x = s.step(oracle_eps, t, x, sampler="ddim").prev_sample
    assert torch.allclose(x, x0, atol=1e-4)


def test_ddim_with_eta_1_is_the_ddpm_ancestral_step(schedule: str) -> None:
    s = NoiseScheduler(T, schedule)
    x0 = _x0()
    xt = torch.randn(x0.shape, generator=torch.Generator().manual_seed(6))
    for n in (T, 13):
        s.set_timesteps(n)
        t = int(s.timesteps[3])
        out = s.eps_from_x0(xt, x0, torch.full((4,), t))
        ddpm = s.step(out, t, xt, sampler="ddpm", generator=torch.Generator().manual_seed(7)).prev_sample
        ddim = s.step(out, t, xt, sampler="ddim", eta=1.0, generator=torch.Generator().manual_seed(7))
        assert torch.allclose(ddpm, ddim.prev_sample, atol=1e-5)


def test_ddpm_step_samples_the_posterior(schedule: str) -> None:
    s = NoiseScheduler(T, schedule)
    s.set_timesteps(T)
    n, t = 100_000, 300
    x0 = _x0((1, 1, 1, 2)).expand(n, 1, 1, 2)
    xt = torch.tensor([0.5, -1.5]).reshape(1, 1, 1, 2).expand(n, 1, 1, 2)
    tt = torch.full((n,), t)
    out = s.eps_from_x0(xt, x0, tt)
    prev = s.step(out, t, xt, sampler="ddpm", generator=torch.Generator().manual_seed(8)).prev_sample
    mean, var = s.posterior(x0[:1], xt[:1], tt[:1])
    assert torch.allclose(prev.mean(0), mean[0], atol=5 * var.sqrt().max().item() / math.sqrt(n))
    assert torch.allclose(prev.var(0), var[0].expand(1, 1, 2), rtol=0.03)


def test_step_clips_x0_and_rederives_eps() -> None:
    s = NoiseScheduler(T, "linear", "epsilon")
    s.set_timesteps(10)
    t = int(s.timesteps[5])
    tt = torch.full((1,), t)
    xt = torch.full((1, 1, 1, 1), 3.0)
    out = torch.full((1, 1, 1, 1), -4.0)  # implies x0 far above 1
    assert s.predict_x0(xt, out, tt).item() > 1.5
    step = s.step(out, t, xt, sampler="ddim")
    assert step.pred_x0.item() == 1.0
    ab, ab_prev = s.alphas_cumprod[t], s.alphas_cumprod[s.previous_timestep(t)]
    eps = (xt - ab.sqrt() * 1.0) / (1 - ab).sqrt()  # consistent with the clipped x0, not the raw output
    assert step.prev_sample.item() == pytest.approx(
        (ab_prev.sqrt() + (1 - ab_prev).sqrt() * eps).item(), rel=1e-5
    )
    unclipped = NoiseScheduler(T, "linear", "epsilon", clip_sample=False)
    unclipped.set_timesteps(10)
    assert unclipped.step(out, t, xt).pred_x0.item() > 1.5


def test_randomness_comes_from_the_generator_and_steps_run_in_float32() -> None:
    s = NoiseScheduler(T, "cosine", "v")
    s.set_timesteps(5)
    t = int(s.timesteps[1])
    xt = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    out = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1)).bfloat16()

    def run(seed: int, sampler: str, eta: float = 0.0) -> torch.Tensor:
        return s.step(
            out, t, xt, sampler=sampler, eta=eta, generator=torch.Generator().manual_seed(seed)
        ).prev_sample

    for sampler, eta in (("ddpm", 0.0), ("ddim", 0.5)):
        a = run(0, sampler, eta)
        assert a.dtype == torch.float32
        assert torch.equal(a, run(0, sampler, eta))
        assert not torch.allclose(a, run(1, sampler, eta))
    assert torch.equal(run(0, "ddim"), run(1, "ddim"))  # eta = 0 draws nothing


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="beta_schedule"):
        NoiseScheduler(T, "quadratic")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="prediction"):
        NoiseScheduler(T, "linear", "x0")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_train_timesteps"):
        NoiseScheduler(1)
    s = NoiseScheduler(T)
    s.set_timesteps(4)
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match="sampler"):
        s.step(x, T - 1, x, sampler="euler")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="eta"):
        s.step(x, T - 1, x, eta=-1.0)

"""The EMA helper shared by the diffusion and GAN families: warm-up decay, parameters and buffers."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from aigc.models.base import ema_update


def _pair(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    live = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    ema = copy.deepcopy(live).requires_grad_(False)
    return ema, live


def _perturb(live: nn.Module) -> None:
    with torch.no_grad():
        for p in live.parameters():
            p.add_(torch.randn_like(p))
        live.train()(torch.randn(16, 4))  # moves BatchNorm's running statistics (buffers)


@pytest.mark.parametrize("max_decay", [0.0, 0.5, 0.9, 0.999])
def test_decay_is_warmed_up_as_one_plus_n_over_ten_plus_n(max_decay: float) -> None:
    ema, live = _pair()
    updates = torch.zeros((), dtype=torch.long)
    for n in range(50):
        assert ema_update([(ema, live)], updates, max_decay) == min(max_decay, (1 + n) / (10 + n))
        assert int(updates) == n + 1  # incremented in place, as a module buffer needs
    assert updates.dtype == torch.long and updates.dim() == 0


def test_update_lerps_parameters_and_copies_buffers_exactly() -> None:
    """Bit-identical to the per-family loops it replaced: ``ema.lerp_(live, 1 - decay)``, buffers copied."""
    ema, live = _pair()
    ref_ema = copy.deepcopy(ema)
    updates = torch.tensor(3)
    torch.manual_seed(1)
    for _ in range(5):
        _perturb(live)
        n = int(updates)
        decay = min(0.9, (1 + n) / (10 + n))
        with torch.no_grad():
            for pe, pv in zip(ref_ema.parameters(), live.parameters(), strict=True):
                pe.lerp_(pv.detach(), 1.0 - decay)
            for be, bl in zip(ref_ema.buffers(), live.buffers(), strict=True):
                be.copy_(bl)
        ema_update([(ema, live)], updates, 0.9)
        for (name, a), b in zip(ema.state_dict().items(), ref_ema.state_dict().values(), strict=True):
            assert torch.equal(a, b), name
    assert torch.equal(ema[1].running_mean, live[1].running_mean)
    assert int(updates) == 8
    assert all(not p.requires_grad for p in ema.parameters())


def test_every_pair_moves_with_one_decay_and_one_count() -> None:
    (ema_a, live_a), (ema_b, live_b) = _pair(0), _pair(1)
    for live in (live_a, live_b):
        with torch.no_grad():
            for p in live.parameters():
                p.add_(1.0)
    before = [p.clone() for p in (*ema_a.parameters(), *ema_b.parameters())]
    updates = torch.zeros((), dtype=torch.long)
    decay = ema_update([(ema_a, live_a), (ema_b, live_b)], updates, 0.999)  # n = 0: decay 0.1
    assert decay == pytest.approx(0.1)
    after = [*ema_a.parameters(), *ema_b.parameters()]
    for b, a in zip(before, after, strict=True):
        torch.testing.assert_close(a, b + 0.9)
    assert int(updates) == 1

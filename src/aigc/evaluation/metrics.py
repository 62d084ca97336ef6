"""The numbers behind the ``eval/*`` figures, as plain functions of feature or pixel arrays.

Fréchet distance (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a
Local Nash Equilibrium") between Gaussians fitted to two feature sets:

    FD = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))

The trace of the matrix square root is computed as ``tr((A S2 A)^(1/2))`` with ``A = S1^(1/2)``:
both are symmetric positive semi-definite, so two ``eigh`` calls in float64 give it without the
complex parts and failures ``sqrtm`` shows on the rank-deficient covariances of small samples.

The estimate is biased upwards, by roughly ``(tr S1 + tr S2) / N`` for N samples per side (Chong &
Forsyth 2020, "Effectively Unbiased FID and Inception Score and where to find them"): with 500
samples and 64 features the bias is a visible part of the figure. Compare FDs only at equal sample
counts, and read them against ``eval/fd_train_val`` (real train images against the same val set,
same count), which carries the same bias.
"""

from __future__ import annotations

import numpy as np
import torch


def _as_float64(x: torch.Tensor | np.ndarray) -> np.ndarray:
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return arr.astype(np.float64, copy=False)


def gaussian_stats(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and covariance ``(D, D)`` (unbiased, float64) of ``(N, D)`` features, N >= 2."""
    x = _as_float64(features)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need features of shape (N >= 2, D), got {x.shape}")
    return x.mean(0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance_from_stats(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """FD between N(mu1, s1) and N(mu2, s2) (see the module docstring for the method)."""
    a = _psd_sqrt(s1)
    m = a @ s2 @ a
    tr_covmean = float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum())
    fd = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)
    return max(fd, 0.0)  # rounding can leave -1e-12 for identical sets


def frechet_distance(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray) -> float:
    """FD between feature sets ``x (N, D)`` and ``y (M, D)``."""
    mu1, s1 = gaussian_stats(x)
    mu2, s2 = gaussian_stats(y)
    if mu1.shape != mu2.shape:
        raise ValueError(f"feature dims differ: {mu1.shape[0]} vs {mu2.shape[0]}")
    return frechet_distance_from_stats(mu1, s1, mu2, s2)


def mean_pairwise_distance(x: torch.Tensor) -> float:
    """Mean L2 distance over the distinct pairs of rows of ``x (N, D)``; 0.0 for N < 2."""
    n = x.shape[0]
    if n < 2:
        return 0.0
    d = torch.cdist(x.double(), x.double())  # (N, N), zero diagonal
    return float(d.sum() / (n * (n - 1)))


def group_diversity(x: torch.Tensor, groups: list | torch.Tensor | None, max_per_group: int = 1000) -> float:
    """Mean over groups (those with >= 2 members) of the within-group mean pairwise distance.

    ``groups`` gives each row's group (a label or a prompt); None puts every row in one group.
    Each group is cut to its first ``max_per_group`` rows to bound the O(n^2) cost.
    """
    if groups is None:
        return mean_pairwise_distance(x[:max_per_group])
    keys = groups.tolist() if isinstance(groups, torch.Tensor) else list(groups)
    members: dict = {}
    for i, k in enumerate(keys):
        members.setdefault(k, []).append(i)
    values = [mean_pairwise_distance(x[idx[:max_per_group]]) for idx in members.values() if len(idx) >= 2]
    if not values:
        raise ValueError("diversity needs a group with at least two samples")
    return float(np.mean(values))


def nearest_distances(
    x: torch.Tensor, ref: torch.Tensor, chunk: int = 4096, exclude_self: bool = False
) -> torch.Tensor:
    """Distance from each row of ``x (N, D)`` to its nearest row of ``ref (M, D)``: ``(N,)``.

    ``exclude_self`` skips the identical index (``x`` is ``ref``: leave-one-out distances).
    """
    # float64: cdist's matmul form loses ~1e-3 to cancellation in float32, and exact copies must
    # come out at distance ~0.
    x = x.double()
    best = torch.full((x.shape[0],), float("inf"), dtype=torch.float64)
    for j in range(0, ref.shape[0], chunk):
        d = torch.cdist(x, ref[j : j + chunk].double())  # (N, chunk)
        if exclude_self:
            rows = torch.arange(x.shape[0])
            cols = rows - j
            ok = (cols >= 0) & (cols < d.shape[1])
            d[rows[ok], cols[ok]] = float("inf")
        best = torch.minimum(best, d.min(1).values)
    return best.float()


def pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(N, C, H, W)`` -> float ``(N, C*H*W)`` in [0, 1], the space copies are found in."""
    return images.reshape(images.shape[0], -1).float() / 255.0

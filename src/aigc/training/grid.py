"""Image grids for sample logging and the end-of-run summary."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def image_grid(images: torch.Tensor, nrow: int, pad: int = 1, min_cell: int = 32) -> Image.Image:
    """uint8 ``(N, C, H, W)`` -> one PIL image, ``nrow`` images per row, upscaled (nearest) so tiny
    8×8 samples stay visible in the MLflow UI."""
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
    n, c, h, w = images.shape
    scale = max(1, -(-min_cell // max(h, w)))
    ncol = max(1, min(nrow, n))
    nrows = -(-n // ncol)
    arr = images.permute(0, 2, 3, 1).numpy()  # (N, H, W, C)
    if c == 1:
        arr = np.repeat(arr, 3, axis=-1)
    arr = arr.repeat(scale, axis=1).repeat(scale, axis=2)
    hs, ws = h * scale, w * scale
    grid = np.full((nrows * (hs + pad) + pad, ncol * (ws + pad) + pad, 3), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, ncol)
        y, x = pad + r * (hs + pad), pad + col * (ws + pad)
        grid[y : y + hs, x : x + ws] = arr[i]
    return Image.fromarray(grid)

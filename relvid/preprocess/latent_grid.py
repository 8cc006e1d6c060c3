"""Subject masks on the video grid -> masks on the latent grid (the rule hybrid mask training uses).

Time: latent frame 0 = mask frame 0; latent frame i >= 1 = mean of mask frames
t(i-1)+1 .. ti (so latent masks are fractional in time). Space: a latent cell is the max over its
s x s pixels ("any": any foreground pixel marks the cell, the reference code's rule) or their
mean ("area": the covered fraction).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

SPATIAL_RULES = ("any", "area")


def masks_to_latent_grid(masks: Tensor, time_factor: int, space_factor: int, spatial: str = "any") -> Tensor:
    """(..., T, H, W) masks in [0, 1] -> (..., f, h, w) float32, f = (T-1)/t + 1, h = H/s."""
    if spatial not in SPATIAL_RULES:
        raise ValueError(f"spatial rule {spatial!r}: use one of {SPATIAL_RULES}")
    *lead, frames, height, width = masks.shape
    t, s = time_factor, space_factor
    if frames < 1 or (frames - 1) % t:
        raise ValueError(f"{frames} mask frames is not {t}k+1")
    if height % s or width % s:
        raise ValueError(f"mask size {height}x{width} is not a multiple of {s}")
    x = masks.float().reshape(-1, frames, height, width)  # (N, T, H, W)
    pool = F.max_pool2d if spatial == "any" else F.avg_pool2d
    x = pool(x, s)  # (N, T, h, w)
    n, _, h, w = x.shape
    rest = x[:, 1:].reshape(n, (frames - 1) // t, t, h, w).mean(dim=2)  # (N, f-1, h, w)
    x = torch.cat([x[:, :1], rest], dim=1)  # (N, f, h, w)
    return x.reshape(*lead, x.shape[1], h, w)

"""Vision-token readings as maps on the latent token grid: mean over channels, a 3-component PCA as
RGB, per frame or averaged over frames."""

from __future__ import annotations

import torch
from torch import Tensor


def token_grid(latent_shape: tuple[int, ...], patch_size: int) -> tuple[int, int, int]:
    """(f, h, w) of the vision tokens for a (C, f, H, W) latent: Mochi patches each frame by patch_size."""
    _, f, height, width = latent_shape
    return f, height // patch_size, width // patch_size


def to_grid(tokens: Tensor, grid: tuple[int, int, int]) -> Tensor:
    """(N, ...) token values -> (f, h, w, ...): Mochi orders its vision tokens frame, row, column."""
    f, h, w = grid
    if tokens.shape[0] != f * h * w:
        raise ValueError(f"{tokens.shape[0]} tokens do not fill a {f}x{h}x{w} grid")
    return tokens.reshape(f, h, w, *tokens.shape[1:])


def pca_rgb(features: Tensor) -> Tensor:
    """(..., D) -> (..., 3) in [0, 1]: the top three principal components of the features (over every
    position given), each scaled to [0, 1]. Signs follow the largest-magnitude loading, so reruns match."""
    flat = features.reshape(-1, features.shape[-1]).double()
    centred = flat - flat.mean(0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)  # (k, D)
    comps = vh[:3]
    sign = torch.sign(comps.gather(1, comps.abs().argmax(1, keepdim=True)))  # (3, 1)
    proj = centred @ (comps * sign).T  # (M, c)
    if proj.shape[1] < 3:  # fewer than three channels or positions: pad with grey
        proj = torch.cat([proj, proj.new_zeros(proj.shape[0], 3 - proj.shape[1])], dim=1)
    low, high = proj.min(0).values, proj.max(0).values
    rgb = (proj - low) / (high - low).clamp_min(1e-12)
    return rgb.float().reshape(*features.shape[:-1], 3)


def feature_maps(tokens: Tensor, grid: tuple[int, int, int]) -> dict[str, Tensor]:
    """(N, D) features -> {"mean": (h, w), "pca": (h, w, 3), "mean_frames": (f, h, w), "pca_frames": (f, h, w, 3)}.

    "mean" averages over frames and channels; "pca" is the PCA of the frame-averaged features. The
    per-frame PCA is fitted on every frame together, so colours compare across frames."""
    g = to_grid(tokens.float().cpu(), grid)  # (f, h, w, D)
    avg = g.mean(0)  # (h, w, D)
    return {"mean": avg.mean(-1), "pca": pca_rgb(avg), "mean_frames": g.mean(-1), "pca_frames": pca_rgb(g)}

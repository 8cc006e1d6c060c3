"""The arithmetic of the paper's metrics, independent of any model: keyframes, consistency, Frechet.

Feature extractors (CLIP, I3D) and judges live in their own files and feed these functions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn


def keyframe_indices(num_frames: int, n: int = 5) -> list[int]:
    """`n` evenly spaced frame indices, first and last included (61 frames, n=5 -> 0, 15, 30, 45, 60).

    Positions i * (num_frames - 1) / (n - 1) rounded half up, so the choice does not depend on
    float rounding.
    """
    if num_frames < 1:
        raise ValueError(f"keyframe_indices: num_frames must be >= 1, got {num_frames}")
    if n < 2:
        raise ValueError(f"keyframe_indices: n must be >= 2 to include the first and the last frame, got {n}")
    if n > num_frames:
        raise ValueError(f"keyframe_indices: cannot pick {n} distinct keyframes from {num_frames} frames")
    span = num_frames - 1
    # round(i * span / (n - 1)) with halves rounded up, in integers
    return [(2 * i * span + (n - 1)) // (2 * (n - 1)) for i in range(n)]


def temporal_consistency(features: Tensor) -> float:
    """Mean cosine similarity of consecutive rows of (T, D) frame features (1.0 for a still video)."""
    if features.dim() != 2 or features.shape[0] < 2:
        raise ValueError(f"temporal_consistency: need (T, D) features with T >= 2, got {tuple(features.shape)}")
    f = features.double()
    cos = torch.nn.functional.cosine_similarity(f[:-1], f[1:], dim=-1)  # (T - 1,)
    return float(cos.mean())


def cosine_similarity(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise cosine similarity of (N, D) and (N, D) (or broadcastable) features, float64."""
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """{"mean", "std", "n"} with the population std (0 for a single value)."""
    if len(values) == 0:
        raise ValueError("mean_std: no values")
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / len(values)
    return {"mean": float(mean), "std": float(math.sqrt(var)), "n": len(values)}


class _Precomputed(nn.Module):
    """A 'feature extractor' for torchmetrics' Frechet metric that passes features through."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features.double()


def frechet_distance(features_a: Tensor, features_b: Tensor) -> float:
    """Frechet distance between Gaussians fitted to (N, D) and (M, D) features (N, M >= 2).

    d^2 = |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)), computed by torchmetrics'
    FrechetInceptionDistance (float64 moments) with the features handed in directly.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    for name, f in (("features_a", features_a), ("features_b", features_b)):
        if f.dim() != 2 or f.shape[0] < 2:
            raise ValueError(f"frechet_distance: {name} must be (N, D) with N >= 2, got {tuple(f.shape)}")
    if features_a.shape[1] != features_b.shape[1]:
        raise ValueError(f"frechet_distance: feature sizes differ ({features_a.shape[1]} vs {features_b.shape[1]})")
    metric = FrechetInceptionDistance(feature=_Precomputed(int(features_a.shape[1])))
    metric.update(features_a.double().cpu(), real=True)
    metric.update(features_b.double().cpu(), real=False)
    return float(metric.compute())

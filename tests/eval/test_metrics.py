"""Metric arithmetic: keyframes, temporal consistency, the Frechet distance."""

import pytest
import torch

from relvid.eval.metrics import frechet_distance, keyframe_indices, mean_std, temporal_consistency


def test_keyframes_are_evenly_spaced_with_first_and_last():
    assert keyframe_indices(61) == [0, 15, 30, 45, 60]
    assert keyframe_indices(5) == [0, 1, 2, 3, 4]
    assert keyframe_indices(10, n=2) == [0, 9]
    assert keyframe_indices(8) == [0, 2, 4, 5, 7]  # 1.75 -> 2, 3.5 -> 4 (half up), 5.25 -> 5
    for frames in range(5, 200):
        idx = keyframe_indices(frames)
        assert idx[0] == 0 and idx[-1] == frames - 1 and len(set(idx)) == 5 and idx == sorted(idx)
    with pytest.raises(ValueError, match="distinct"):
        keyframe_indices(3)


def test_identical_frames_have_temporal_consistency_one():
    feats = torch.randn(1, 16).expand(12, 16)
    assert temporal_consistency(feats) == pytest.approx(1.0, abs=1e-12)


def test_temporal_consistency_of_alternating_frames():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    feats = torch.stack([a, b, a, b, a])  # orthogonal neighbours: cosine 0
    assert temporal_consistency(feats) == pytest.approx(0.0, abs=1e-12)
    feats = torch.stack([a, a, -a])  # cosines 1 and -1
    assert temporal_consistency(feats) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="T >= 2"):
        temporal_consistency(torch.randn(1, 4))


def _reference_frechet(x: torch.Tensor, y: torch.Tensor) -> float:
    """Float64 reference: Tr sqrt(S1 S2) as Tr sqrt(S1^1/2 S2 S1^1/2) with symmetric eigendecompositions."""
    x, y = x.double(), y.double()
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = torch.cov(x.T), torch.cov(y.T)
    w, v = torch.linalg.eigh(s1)
    root1 = v @ torch.diag(w.clamp(min=0).sqrt()) @ v.T
    inner = root1 @ s2 @ root1
    tr_sqrt = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp(min=0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * tr_sqrt)


def test_frechet_distance_matches_a_float64_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 8, generator=g)
    y = torch.randn(150, 8, generator=g) @ torch.randn(8, 8, generator=g) * 0.5 + 1.0
    assert frechet_distance(x, y) == pytest.approx(_reference_frechet(x, y), rel=1e-6)
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    # a pure mean shift of 2 in every one of 8 dimensions: distance 8 * 2^2
    assert frechet_distance(x, x + 2.0) == pytest.approx(32.0, rel=1e-6)


def test_mean_std():
    assert mean_std([1.0, 0.0, 1.0, 0.0]) == {"mean": 0.5, "std": 0.5, "n": 4}

import itertools

import pytest
import torch
import torch.nn.functional as F

from relvid.losses.flow_matching import (
    hybrid_mask_weight,
    masked_flow_loss,
    model_timestep,
    noisy_latents,
    relation_mask,
    sample_sigmas,
    velocity_target,
)


def _hand_loss(pred, target, mask, lambda_m, form):
    """The HMT loss written out element by element in float64."""
    b, c, f, h, w = pred.shape
    total = 0.0
    for i, j, k, y, x in itertools.product(range(b), range(c), range(f), range(h), range(w)):
        m = float(mask[i, k, y, x])
        weight = 1 + lambda_m * (m if form == "linear" else m * m)
        diff = float(pred[i, j, k, y, x]) - float(target[i, j, k, y, x])
        total += weight * diff * diff
    return total / (b * c * f * h * w)


@pytest.mark.parametrize("form", ["linear", "squared"])
def test_masked_flow_loss_matches_hand_computation(form):
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 3, 2, 2, 4, generator=g), torch.randn(2, 3, 2, 2, 4, generator=g)
    mask = torch.rand(2, 2, 2, 4, generator=g)  # fractional, as after temporal averaging
    got = masked_flow_loss(pred, target, mask, lambda_m=50.0, form=form)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(_hand_loss(pred, target, mask, 50.0, form), rel=1e-5)


def test_masked_flow_loss_without_mask_is_mse_and_float32_for_bf16_inputs():
    g = torch.Generator().manual_seed(1)
    pred, target = torch.randn(1, 4, 3, 2, 2, generator=g), torch.randn(1, 4, 3, 2, 2, generator=g)
    assert masked_flow_loss(pred, target, None).item() == pytest.approx(F.mse_loss(pred, target).item(), rel=1e-6)
    loss_bf16 = masked_flow_loss(pred.bfloat16(), target.bfloat16(), torch.ones(1, 3, 2, 2, dtype=torch.bfloat16))
    assert loss_bf16.dtype == torch.float32


def test_linear_and_squared_agree_for_binary_masks_and_differ_for_fractional():
    g = torch.Generator().manual_seed(2)
    pred, target = torch.randn(1, 2, 3, 2, 2, generator=g), torch.randn(1, 2, 3, 2, 2, generator=g)
    binary = (torch.rand(1, 3, 2, 2, generator=g) > 0.5).float()
    fractional = torch.full((1, 3, 2, 2), 0.5)
    lin, sq = (masked_flow_loss(pred, target, binary, form=f) for f in ("linear", "squared"))
    assert torch.equal(lin, sq)
    lin, sq = (masked_flow_loss(pred, target, fractional, form=f) for f in ("linear", "squared"))
    assert lin.item() > sq.item() * 1.5  # weights 26 vs 13.5


def test_hybrid_mask_weight_shape_and_values():
    mask = torch.tensor([0.0, 0.5, 1.0]).view(1, 3, 1, 1)
    w = hybrid_mask_weight(mask, lambda_m=50.0)
    assert w.shape == (1, 1, 3, 1, 1)
    assert w.flatten().tolist() == [1.0, 26.0, 51.0]
    assert hybrid_mask_weight(mask, 50.0, "squared").flatten().tolist() == [1.0, 13.5, 51.0]


def test_relation_mask_union_vs_sum_on_overlap():
    s1 = torch.tensor([[1.0, 1.0, 0.0]])
    s2 = torch.tensor([[0.0, 1.0, 0.5]])
    masks = torch.stack([s1, s2]).view(1, 2, 1, 1, 3)  # (B, 2, f, h, w)
    assert relation_mask(masks).flatten().tolist() == [1.0, 1.0, 0.5]
    assert relation_mask(masks, "sum").flatten().tolist() == [1.0, 2.0, 0.5]


def test_relation_mask_reads_the_cached_mask_through_the_same_rule():
    """The cache's relation_mask (written at encode time by this function) is what union training uses;
    sum, the reference code's rule, always adds the subject masks."""
    masks = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 0.5]]).view(1, 2, 1, 1, 3)
    stored = torch.tensor([0.9, 0.8, 0.7]).view(1, 1, 1, 3)
    assert torch.equal(relation_mask(masks, "union", stored=stored), stored)
    assert relation_mask(masks, "sum", stored=stored).flatten().tolist() == [1.0, 2.0, 0.5]
    with pytest.raises(ValueError, match="does not match the subject masks' grid"):
        relation_mask(masks, "union", stored=torch.zeros(1, 1, 3, 1))


def test_preprocessing_and_the_datamodule_use_the_one_rule(tmp_path, random_cache):
    from relvid.data.datamodule import RelationDataset

    cache = random_cache(n_clips=2)
    record = cache.read(cache.clip_ids()[0])
    assert torch.equal(record.relation_mask, relation_mask(record.subject_masks[None].float())[0])
    item = RelationDataset(cache)[0]
    assert torch.equal(item["relation_mask"], relation_mask(item["subject_masks"][None])[0])


def test_unknown_mode_or_form_names_the_accepted_values():
    with pytest.raises(ValueError, match="union"):
        relation_mask(torch.zeros(1, 2, 1, 2, 2), mode="intersection")
    with pytest.raises(ValueError, match="squared"):
        hybrid_mask_weight(torch.zeros(1, 1, 2, 2), form="cubic")
    with pytest.raises(ValueError, match="linear"):
        masked_flow_loss(torch.zeros(1, 1, 1, 2, 2), torch.zeros(1, 1, 1, 2, 2), torch.zeros(1, 1, 2, 2), form="x")


def test_mask_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="mask"):
        masked_flow_loss(torch.zeros(1, 2, 3, 2, 2), torch.zeros(1, 2, 3, 2, 2), torch.zeros(1, 2, 2, 2))


def test_noise_path_endpoints_and_velocity():
    g = torch.Generator().manual_seed(3)
    z0, noise = torch.randn(2, 3, 2, 2, 2, generator=g), torch.randn(2, 3, 2, 2, 2, generator=g)
    assert torch.equal(noisy_latents(z0, noise, torch.tensor([0.0, 1.0]))[0], z0[0])
    assert torch.equal(noisy_latents(z0, noise, torch.tensor([0.0, 1.0]))[1], noise[1])
    # moving sigma down by d moves the latent by d * v: v points from noise to data
    d = 0.25
    step = noisy_latents(z0, noise, torch.full((2,), 0.5)) - noisy_latents(z0, noise, torch.full((2,), 0.5 + d))
    torch.testing.assert_close(step, d * velocity_target(z0, noise))
    assert model_timestep(torch.tensor([1.0, 0.25, 0.0])).tolist() == [0.0, 750.0, 1000.0]


def test_sample_sigmas_uniform_and_reproducible():
    a = sample_sigmas(1000, torch.Generator().manual_seed(4))
    b = sample_sigmas(1000, torch.Generator().manual_seed(4))
    assert a.shape == (1000,) and torch.equal(a, b)
    assert 0.0 <= a.min().item() and a.max().item() < 1.0
    assert abs(a.mean().item() - 0.5) < 0.05

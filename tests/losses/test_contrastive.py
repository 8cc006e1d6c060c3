import math

import pytest
import torch

from relvid.losses.contrastive import (
    MemoryBank,
    frame_features,
    rcl_loss_for_batch,
    relational_contrastive_loss,
    relational_dynamics,
)


def _direct_loss(anchors, positives, negatives, tau):
    """Multi-positive InfoNCE written out with loops and math.exp / math.log in float64."""

    def unit(v):
        norm = math.sqrt(sum(float(x) ** 2 for x in v))
        return [float(x) / norm for x in v]

    def cos(u, v):
        return sum(a * b for a, b in zip(unit(u), unit(v), strict=True))

    total = 0.0
    for n in range(anchors.shape[0]):
        pos = sum(math.exp(cos(anchors[n], p) / tau) for p in positives[n])
        neg = sum(math.exp(cos(anchors[n], q) / tau) for q in negatives[n])
        total += -math.log(pos / (pos + neg))
    return total / anchors.shape[0]


def _bank_entry(value: float, f: int = 4, c: int = 3):
    """A (1, F-1, C) dynamics and (1, F, C) frames filled so an entry can be recognised by its value."""
    return torch.full((1, f - 1, c), value), torch.full((1, f, c), value)


def test_relational_contrastive_loss_matches_direct_computation():
    anchors = torch.tensor([[1.0, 0.0, 0.5], [0.2, -1.0, 0.3]])
    positives = torch.tensor([[[0.9, 0.1, 0.4], [1.0, 0.5, 0.0]], [[0.0, -1.0, 0.0], [0.3, -0.8, 0.6]]])
    negatives = torch.tensor(
        [[[0.0, 1.0, 0.0], [-1.0, 0.2, 0.1], [0.5, 0.5, 0.5]], [[1.0, 1.0, -1.0], [0.1, 0.9, 0.2], [-0.3, 0.0, 1.0]]]
    )
    for tau in (0.07, 0.5):
        got = relational_contrastive_loss(anchors, positives, negatives, tau=tau)
        assert got.item() == pytest.approx(_direct_loss(anchors, positives, negatives, tau), rel=1e-5, abs=1e-6)


def test_relational_contrastive_loss_is_scale_invariant_and_gradient_reaches_anchors():
    g = torch.Generator().manual_seed(0)
    anchors = torch.randn(5, 4, generator=g, requires_grad=True)
    positives, negatives = torch.randn(5, 2, 4, generator=g), torch.randn(5, 3, 4, generator=g)
    loss = relational_contrastive_loss(anchors, positives, negatives)
    torch.testing.assert_close(relational_contrastive_loss(anchors * 7.0, positives * 0.1, negatives), loss)
    loss.backward()
    assert anchors.grad is not None and anchors.grad.abs().sum() > 0


def test_frame_features_and_dynamics():
    output = torch.arange(2 * 3 * 4 * 2 * 2, dtype=torch.float32).view(2, 3, 4, 2, 2)
    frames = frame_features(output)
    assert frames.shape == (2, 4, 3)
    assert frames[1, 2, 0].item() == output[1, 0, 2].mean().item()
    dynamics = relational_dynamics(frames)
    assert dynamics.shape == (2, 3, 3)
    torch.testing.assert_close(dynamics[0, 1], frames[0, 2] - frames[0, 1])


def test_bank_is_fifo_with_a_size_limit():
    bank = MemoryBank(size=3)
    for clip in range(5):
        bank.push([clip], *_bank_entry(float(clip)))
    assert len(bank) == 3
    state = bank.state_dict()
    assert state["clip_index"].tolist() == [2, 3, 4]  # oldest first, 0 and 1 dropped
    assert state["frames"][:, 0, 0].tolist() == [2.0, 3.0, 4.0]


def test_bank_push_of_a_batch_keeps_batch_order_and_detaches():
    bank = MemoryBank(size=8)
    dyn = torch.randn(2, 3, 3, requires_grad=True)
    frames = torch.randn(2, 4, 3, requires_grad=True)
    bank.push(torch.tensor([7, 9]), dyn * 1, frames * 1)
    state = bank.state_dict()
    assert state["clip_index"].tolist() == [7, 9]
    assert not state["dynamics"].requires_grad and state["dynamics"].dtype == torch.float32
    torch.testing.assert_close(state["dynamics"], dyn.detach())


def test_bank_positives_exclude_the_same_clip():
    bank = MemoryBank()
    bank.push([0, 1, 0, 2], torch.cat([_bank_entry(v)[0] for v in (0.0, 1.0, 0.0, 2.0)]),
              torch.cat([_bank_entry(v)[1] for v in (0.0, 1.0, 0.0, 2.0)]))
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        pos = bank.positives(exclude_clip=0, n_pos=4, generator=g)
        assert pos.shape == (2, 3, 3)  # only clips 1 and 2 qualify
        assert sorted(pos[:, 0, 0].tolist()) == [1.0, 2.0]
    assert bank.positives(exclude_clip=1, n_pos=1, generator=g)[0, 0, 0].item() in (0.0, 2.0)
    only_same = MemoryBank()
    only_same.push([5], *_bank_entry(5.0))
    assert only_same.positives(exclude_clip=5, n_pos=4, generator=g) is None


def test_bank_negatives_are_single_frames_drawn_from_all_entries():
    bank = MemoryBank()
    assert bank.negatives(3, torch.Generator()) is None
    bank.push([0, 1], torch.zeros(2, 3, 3), torch.randn(2, 4, 3))
    neg = bank.negatives(5, torch.Generator().manual_seed(0))
    assert neg.shape == (5, 3)
    assert bank.negatives(100, torch.Generator()).shape == (8, 3)  # capped at the 2 x 4 frames held


def test_bank_state_dict_round_trip():
    bank = MemoryBank(size=4)
    g = torch.Generator().manual_seed(1)
    for clip in range(6):
        bank.push([clip % 3], torch.randn(1, 3, 3, generator=g), torch.randn(1, 4, 3, generator=g))
    restored = MemoryBank(size=4)
    restored.load_state_dict(bank.state_dict())
    for key, value in bank.state_dict().items():
        other = restored.state_dict()[key]
        assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other
    a = bank.positives(0, 2, torch.Generator().manual_seed(3))
    b = restored.positives(0, 2, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    empty = MemoryBank(size=4)
    empty.load_state_dict(MemoryBank(size=4).state_dict())
    assert len(empty) == 0
    with pytest.raises(ValueError, match="size"):
        MemoryBank(size=5).load_state_dict(bank.state_dict())


def test_bank_rejects_videos_of_another_length():
    bank = MemoryBank()
    bank.push([0], *_bank_entry(0.0, f=4))
    with pytest.raises(ValueError, match="same number of latent frames"):
        bank.push([1], *_bank_entry(1.0, f=5))


def test_rcl_is_none_without_positives_and_never_pushes():
    output = torch.randn(1, 3, 4, 2, 2)
    bank = MemoryBank()
    loss, info = rcl_loss_for_batch(output, torch.tensor([0]), bank)
    assert loss is None and info["n_pos"] == 0
    assert info["frames"].shape == (1, 4, 3) and info["dynamics"].shape == (1, 3, 3)
    bank.push([0], info["dynamics"], info["frames"])  # the same clip only
    loss, _ = rcl_loss_for_batch(output, torch.tensor([0]), bank)
    assert loss is None
    assert len(bank) == 1


def test_rcl_uses_same_index_positives_and_current_frames_as_negatives():
    g = torch.Generator().manual_seed(0)
    output = torch.randn(1, 3, 4, 2, 2, generator=g, requires_grad=True)  # (B, C, F, H, W)
    other_frames = torch.randn(1, 4, 3, generator=g)
    bank = MemoryBank()
    bank.push([1], relational_dynamics(other_frames), other_frames)
    # n_neg = F: the negatives are exactly the current video's 4 frames (in some order)
    loss, info = rcl_loss_for_batch(output, [0], bank, n_pos=4, n_neg=4, generator=g)
    frames = frame_features(output.detach())[0]  # (F, C)
    anchors = relational_dynamics(frames[None])[0]  # (F-1, C)
    positives = relational_dynamics(other_frames)[0][:, None]  # (F-1, 1, C): same frame-difference index
    expected = _direct_loss(anchors, positives, [frames] * 3, 0.07)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert info["n_pos"] == 1 and info["n_neg"] == 4
    assert not info["frames"].requires_grad and not info["dynamics"].requires_grad
    loss.backward()
    assert output.grad is not None and output.grad.abs().sum() > 0


def test_rcl_fills_negatives_from_the_bank_and_skips_videos_without_positives():
    g = torch.Generator().manual_seed(1)
    bank = MemoryBank()
    bank.push([0, 1, 2], torch.randn(3, 3, 3, generator=g), torch.randn(3, 4, 3, generator=g))
    output = torch.randn(2, 3, 4, 2, 2, generator=g)
    loss, info = rcl_loss_for_batch(output, [1, 3], bank, n_pos=2, n_neg=10, generator=g)
    assert torch.isfinite(loss)
    assert info["n_pos"] == 2 and info["n_neg"] == 10  # 4 current frames + 6 from the bank
    alone = MemoryBank()
    alone.push([1], *_bank_entry(1.0))
    loss_b, _ = rcl_loss_for_batch(output, [1, 3], alone, generator=g)  # video 0 has no positives
    loss_1, _ = rcl_loss_for_batch(output[1:], [3], alone, generator=g)
    torch.testing.assert_close(loss_b, loss_1)


def test_rcl_is_reproducible_with_a_seeded_generator():
    g = torch.Generator().manual_seed(2)
    bank = MemoryBank()
    for clip in range(6):
        bank.push([clip], torch.randn(1, 3, 3, generator=g), torch.randn(1, 4, 3, generator=g))
    output = torch.randn(1, 3, 4, 2, 2, generator=g)
    a, _ = rcl_loss_for_batch(output, [0], bank, n_pos=2, n_neg=6, generator=torch.Generator().manual_seed(9))
    b, _ = rcl_loss_for_batch(output, [0], bank, n_pos=2, n_neg=6, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a, b)


def test_rcl_is_float32_under_bf16_autocast():
    """Lightning's bf16-mixed wraps the step in autocast: the cosines must still be float32 (a bf16 cosine
    is rounded by up to ~4e-3, which the division by tau = 0.07 turns into ~0.06 of a logit)."""
    g = torch.Generator().manual_seed(0)
    anchors, positives, negatives = (torch.randn(*s, 64, generator=g) for s in ((6,), (6, 4), (6, 10)))
    reference = relational_contrastive_loss(anchors, positives, negatives)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = relational_contrastive_loss(anchors, positives, negatives)
    assert got.dtype == torch.float32
    assert abs(got.item() - reference.item()) < 1e-6

    bank = MemoryBank(8)
    bank.push([0, 1, 2], torch.randn(3, 5, 64, generator=g), torch.randn(3, 6, 64, generator=g))
    output = torch.randn(2, 64, 6, 2, 2, generator=g)  # (B, C, F, H, W)
    reference, _ = rcl_loss_for_batch(output, [3, 4], bank, generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = rcl_loss_for_batch(output, [3, 4], bank, generator=torch.Generator().manual_seed(1))
    assert got.dtype == torch.float32
    assert abs(got.item() - reference.item()) < 1e-6


def test_split_bank_keeps_the_last_videos_for_positives_and_the_last_frames_for_negatives():
    """rcl.bank=split (reference code, buffer.py): positives from the last N videos, negatives from the
    last M single frames, oldest first; both survive a checkpoint."""
    from relvid.losses.contrastive import SplitMemoryBank

    bank = SplitMemoryBank(positive_videos=2, negative_frames=5)
    for clip in range(3):
        bank.push([clip], *_bank_entry(float(clip)))  # 4 frames each
    assert bank.state_dict()["clip_index"].tolist() == [1, 2]
    pool, places = bank.draw_negatives(100, torch.Generator())
    assert pool.shape == (5, 3) and sorted(places) == [0, 1, 2, 3, 4]
    assert bank._frame_pool()[:, 0].tolist() == [1.0, 2.0, 2.0, 2.0, 2.0]  # the last 5 frames pushed
    _, picked = bank.draw_positives(None, 5, torch.Generator())
    assert sorted(picked) == [0, 1]  # without same-clip exclusion a clip may be its own positive
    assert bank.draw_positives(2, 5, torch.Generator())[1] == [0]
    again = SplitMemoryBank(positive_videos=2, negative_frames=5)
    again.load_state_dict(bank.state_dict())
    assert torch.equal(again._frame_pool(), bank._frame_pool())
    with pytest.raises(ValueError, match="rcl.bank"):
        SplitMemoryBank(2, 6).load_state_dict(bank.state_dict())


def test_all_current_negatives_take_every_frame_and_fill_from_the_bank():
    from relvid.losses.contrastive import rcl_loss_for_batch

    bank = MemoryBank()
    bank.push([1], *_bank_entry(1.0, f=5))
    output = torch.randn(1, 3, 5, 2, 2)  # 5 frames, 4 anchors
    g = torch.Generator().manual_seed(0)
    _, sampled = rcl_loss_for_batch(output, [0], bank, n_pos=1, n_neg=3, generator=g)
    _, every = rcl_loss_for_batch(output, [0], bank, n_pos=1, n_neg=3, generator=g, all_current_negatives=True)
    assert sampled["n_neg"] == 3 and every["n_neg"] == 5  # more current frames than n_neg: all of them
    _, filled = rcl_loss_for_batch(output, [0], bank, n_pos=1, n_neg=7, generator=g, all_current_negatives=True)
    assert filled["n_neg"] == 7 and len(filled["draws"][0][0]["negatives"]["bank"]) == 2
    _, own = rcl_loss_for_batch(output, [1], bank, n_pos=1, n_neg=3, generator=g, exclude_same_clip=False)
    assert own["n_pos"] == 1  # the bank holds only clip 1: a positive only without the exclusion

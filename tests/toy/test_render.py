"""The renderer is deterministic from a seed, keeps subjects in the frame, and its masks are
exactly the visible pixels of each subject."""

import pytest
import torch

from relvid.toy.render import render_clip
from relvid.toy.world import COLOURS, FRAMES, GENERIC_MOTIONS, RELATIONS, SIZE, Subject

S1, S2 = Subject("red", "triangle"), Subject("cyan", "cross")


@pytest.mark.parametrize("kind", [*RELATIONS, *GENERIC_MOTIONS])
def test_same_seed_same_clip_other_seed_other_clip(kind):
    a, b, c = render_clip(kind, S1, S2, 7), render_clip(kind, S1, S2, 7), render_clip(kind, S1, S2, 8)
    assert torch.equal(a.video, b.video) and torch.equal(a.masks, b.masks)
    assert not torch.equal(a.video, c.video)
    assert a.video.shape == (3, FRAMES, SIZE, SIZE) and a.masks.shape == (2, FRAMES, SIZE, SIZE)
    assert float(a.tracks.min()) >= 0 and float(a.tracks.max()) <= SIZE - 1


def test_masks_are_the_visible_subject_pixels():
    clip = render_clip("bouncing", S1, S2, 3)  # the subjects touch mid-clip: subject 1 is in front
    frames = (clip.video + 1) / 2  # (3, T, H, W) in [0, 1]
    for k, subject in enumerate((S1, S2)):
        colour = torch.tensor(COLOURS[subject.colour])[:, None, None, None]
        has_colour = ((frames - colour).abs() < 1e-5).all(dim=0)  # (T, H, W)
        assert torch.equal(has_colour, clip.masks[k].bool())
    assert not bool((clip.masks[0].bool() & clip.masks[1].bool()).any())

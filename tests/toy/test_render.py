"""The renderer is deterministic from a seed, keeps subjects in the frame, and its masks are
exactly the visible pixels of each subject."""

import math

import pytest
import torch

from relvid.toy.render import AXIS_JITTER_DEG, EXEMPLAR_STAGING, FREE, Staging, render_clip
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


@pytest.mark.parametrize("relation", [r for r in RELATIONS if r != "orbiting"])
def test_relations_are_staged_left_to_right(relation):
    # Like NTU's two-person clips: subject 1 starts on the left, subject 2 on the right, and the
    # relation plays out along a near-horizontal axis. Orbiting starts left of its centre instead.
    tilt = math.tan(math.radians(AXIS_JITTER_DEG)) + 1e-4
    for seed in range(40):
        t1, t2 = render_clip(relation, S1, S2, seed).tracks  # (T, 2) each
        gap = t2[0] - t1[0]  # along the relation's axis at the start, for every staged relation
        assert float(gap[0]) > 0, f"{relation} seed {seed}: subject 1 does not start on the left"
        assert abs(float(gap[1])) <= tilt * float(gap[0]), f"{relation} seed {seed}: axis too steep"


def test_orbit_starts_left_of_its_centre_and_turns_one_way():
    for seed in range(40):
        mover, centre = render_clip("orbiting", S1, S2, seed).tracks
        rel = mover - centre  # (T, 2)
        assert float(rel[0, 0]) < 0, f"seed {seed}: the orbit does not start left of the partner"
        angle = torch.atan2(rel[:, 1], rel[:, 0])
        steps = torch.remainder(angle[1:] - angle[:-1] + math.pi, 2 * math.pi) - math.pi
        assert bool((steps > 0).all()), f"seed {seed}: the orbit does not turn one way (clockwise on screen)"


@pytest.mark.parametrize("relation", sorted(RELATIONS))
def test_exemplars_are_staged_in_mid_frame_and_vary_a_little(relation):
    # The customization exemplars are filmed as NTU films its actors: the box around both tracks is
    # centred (+- EXEMPLAR_STAGING.centre px), and takes differ far less than freely placed clips.
    staged = [render_clip(relation, S1, S2, seed, EXEMPLAR_STAGING).tracks for seed in range(20)]
    free = [render_clip(relation, S1, S2, seed, FREE).tracks for seed in range(20)]
    for seed, tracks in enumerate(staged):
        both = tracks.reshape(-1, 2)
        middle = (both.min(dim=0).values + both.max(dim=0).values) / 2
        assert float((middle - (SIZE - 1) / 2).abs().max()) <= EXEMPLAR_STAGING.centre + 1e-4, f"seed {seed}"
        assert float(both.min()) >= 0 and float(both.max()) <= SIZE - 1
    def spread(clips):
        return float(torch.stack(clips).std(dim=0).mean())  # across takes, per frame and axis
    assert spread(staged) < 0.5 * spread(free)
    assert spread(staged) > 0  # still 20 different takes


def test_free_staging_is_the_default_and_staging_is_checked():
    assert torch.equal(render_clip("pushing", S1, S2, 5).video, render_clip("pushing", S1, S2, 5, FREE).video)
    with pytest.raises(ValueError, match="spread"):
        Staging(spread=1.5)
    with pytest.raises(ValueError, match="centre"):
        Staging(centre=-1.0)

"""Subject masks from NTU skeletons: placement, identity by bodyID, odd frames."""

import pytest
import torch

from relvid.preprocess.ntu import parse_skeleton
from relvid.preprocess.skeleton_masks import skeleton_masks
from relvid.preprocess.video import ClipSkipped, centre_crop
from tests.helpers.preprocess import standing_body, two_people_frames, write_skeleton

H, W = 96, 160  # a small target of roughly 848:480
CROP = centre_crop(1080, 1920, H, W)


def columns(mask: torch.Tensor) -> float:
    """Mean x of a (H, W) mask's foreground."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return float(xs.float().mean())


def test_each_subject_sits_over_its_body_and_stays_itself_across_frames(tmp_path):
    seq = parse_skeleton(write_skeleton(tmp_path / "s.skeleton", two_people_frames(13)))
    masks = skeleton_masks(seq, list(range(13)), CROP, H, W)
    assert masks.shape == (2, 13, H, W) and set(masks.unique().tolist()) <= {0.0, 1.0}
    for t in range(13):
        left, right = columns(masks[0, t]), columns(masks[1, t])
        # subject 1 is the left person (written second in every frame): x = 600 + 10 t in 1920 pixels
        assert left == pytest.approx((600 + 10 * t - CROP.left) * CROP.scale, abs=4)
        assert right == pytest.approx((1300 - 10 * t - CROP.left) * CROP.scale, abs=4)
    assert (masks[:, :, :5].sum() == 0)  # nothing above the heads
    inside = masks[0, 0, round(600 * CROP.scale) - 20 : round(600 * CROP.scale) + 20, :].sum()
    assert inside > 0


def test_spurious_third_body_missing_frames_and_short_skeletons(tmp_path):
    frames = two_people_frames(10)
    frames[3] = []  # Kinect lost everyone
    frames[4] = [frames[4][0]]  # only the right person
    frames[5] = frames[5] + [(999, standing_body(960))]  # a spurious third body for one frame
    seq = parse_skeleton(write_skeleton(tmp_path / "s.skeleton", frames))
    masks = skeleton_masks(seq, list(range(13)), CROP, H, W)  # 3 frames past the skeleton's end
    per_frame = masks.sum(dim=(2, 3))  # (2, T)
    assert per_frame[:, 3].tolist() == [0.0, 0.0]
    assert per_frame[0, 4] == 0 and per_frame[1, 4] > 0
    assert (per_frame[:, 10:] == 0).all()
    centre = masks[:, 5, :, round((960 - CROP.left) * CROP.scale)]
    assert centre.sum() == 0  # the third body belongs to neither subject


def test_joints_outside_the_frame_and_untracked_joints_do_not_crash(tmp_path):
    far = standing_body(2500, y=-2000)  # entirely outside the 1920x1080 frame
    frames = [[(1, standing_body(400)), (2, far)] for _ in range(7)]
    path = write_skeleton(tmp_path / "s.skeleton", frames)
    # the first body untracked in frame 0
    text = path.read_text().replace(" 0.5 0.5 0.5 0.5 2\n", " 0.5 0.5 0.5 0.5 0\n", 25)
    path.write_text(text)
    masks = skeleton_masks(parse_skeleton(path), list(range(7)), CROP, H, W)
    assert masks[1].sum() == 0  # off-screen person: empty but present
    assert masks[0, 0].sum() == 0 and masks[0, 1].sum() > 0


def test_a_single_person_is_a_skip(tmp_path):
    seq = parse_skeleton(write_skeleton(tmp_path / "s.skeleton", [[(1, standing_body(500))]] * 7))
    with pytest.raises(ClipSkipped, match="1 body"):
        skeleton_masks(seq, list(range(7)), CROP, H, W)


def test_downscaled_video_gets_scaled_joints(tmp_path):
    seq = parse_skeleton(write_skeleton(tmp_path / "s.skeleton", two_people_frames(7)))
    crop_small = centre_crop(108, 192, H, W)
    full = skeleton_masks(seq, list(range(7)), CROP, H, W)
    small = skeleton_masks(seq, list(range(7)), crop_small, H, W, source_size=(108, 192))
    assert (full != small).float().mean() < 0.02  # same silhouettes up to rounding

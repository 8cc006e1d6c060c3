"""Grounded-SAM: identity tracking of two subjects, and the tiny random models end to end."""

import numpy as np
import pytest
import torch

from relvid.models.backbone import WeightsNotFoundError
from relvid.preprocess.grounded_sam import GroundedSam, track_two
from relvid.preprocess.sources import Source
from relvid.preprocess.video import Clip, ClipSkipped, centre_crop
from tests.helpers.preprocess import save_tiny_grounding_dino, save_tiny_sam


def box(x, w=20.0):
    return [x, 10.0, x + w, 60.0]


def test_identities_survive_crossing_reordering_misses_and_a_spurious_box():
    # Two people cross: A walks right from x=0, B walks left from x=100; the detector lists them in
    # varying order, misses B once, and adds a low-score box once.
    detections = []
    for t in range(8):
        a, b = box(10.0 * t), box(100.0 - 10.0 * t)
        rows = [b, a] if t % 2 else [a, b]
        if t == 3:
            rows = [a]
        if t == 5:
            rows = rows + [box(300.0)]
        detections.append(torch.tensor(rows))
    tracks = track_two(detections)
    for t, pair in enumerate(tracks):
        expected_b = box(100.0 - 10.0 * t) if t != 3 else box(100.0 - 20.0)  # missed: keeps its last box
        assert pair[0].tolist() == box(10.0 * t) and pair[1].tolist() == expected_b, t


def test_nothing_until_two_are_seen():
    tracks = track_two([torch.zeros(0, 4), torch.tensor([box(0)]), torch.tensor([box(50), box(0)])])
    assert tracks[0] is None and tracks[1] is None
    assert tracks[2][0].tolist() == box(0)  # left one first


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("gsam")
    return save_tiny_grounding_dino(root / "gdino"), save_tiny_sam(root / "sam")


@pytest.fixture(scope="module")
def grounded_sam(folders):
    # Thresholds 0: a random detector's scores are tiny; every query counts as a detection.
    return GroundedSam.from_folders(*folders, prompt="Person", box_threshold=0.0, text_threshold=0.0, batch_size=4)


def test_tiny_models_from_local_folders_give_two_masks_per_frame(grounded_sam, tmp_path):
    assert grounded_sam.prompt == "person."
    frames = np.random.default_rng(0).integers(0, 255, (3, 48, 80, 3), dtype=np.uint8)
    clip = Clip(frames, list(range(3)), 30.0, (48, 80), centre_crop(48, 80, 48, 80))
    masks = grounded_sam(Source("c", tmp_path / "c.mp4", "x"), clip)
    assert masks.shape == (2, 3, 48, 80) and set(masks.unique().tolist()) <= {0.0, 1.0}
    boxes = grounded_sam.detect(frames[:2])  # batches of 4 with a remainder of 2 above
    assert len(boxes) == 2 and boxes[0].shape[1] == 4


def test_no_detections_is_a_skip_and_missing_weights_an_error(grounded_sam, tmp_path):
    grounded_sam.box_threshold = 1.1  # nothing passes
    frames = np.zeros((2, 48, 80, 3), dtype=np.uint8)
    clip = Clip(frames, list(range(2)), 30.0, (48, 80), centre_crop(48, 80, 48, 80))
    try:
        with pytest.raises(ClipSkipped, match="fewer than 2"):
            grounded_sam(Source("c", tmp_path / "c.mp4", "x"), clip)
    finally:
        grounded_sam.box_threshold = 0.0
    with pytest.raises(WeightsNotFoundError, match="grounding-dino"):
        GroundedSam.from_folders(tmp_path / "none", tmp_path / "none")
    with pytest.raises(WeightsNotFoundError, match="path not set"):
        GroundedSam.from_folders(None, None)


def test_preprocess_own_videos_with_grounded_sam(folders, tmp_path):
    from relvid.cli import main
    from relvid.data.cache import ClipCache
    from tests.helpers.preprocess import save_tiny_t5, save_tiny_vae, write_video

    mochi = save_tiny_t5(save_tiny_vae(tmp_path / "mochi"))
    frames = np.random.default_rng(0).integers(0, 255, (7, 32, 48, 3), dtype=np.uint8)
    write_video(tmp_path / "videos" / "hug.mp4", frames)
    (tmp_path / "videos" / "hug.txt").write_text("A person is hugging a person.")
    out = tmp_path / "cache"
    assert main(["preprocess", "-r", "hug", "--videos", str(tmp_path / "videos"), "--mask-source", "grounded-sam",
                 "--gdino-path", str(folders[0]), "--sam-path", str(folders[1]), "--box-threshold", "0",
                 "--text-threshold", "0", "--mochi-path", str(mochi), "--out", str(out), "--frames", "7",
                 "--height", "32", "--width", "48", "--device", "cpu", "--no-progress"]) == 0
    record = ClipCache(out).read("hug")
    assert record.subject_masks.shape == (2, 2, 4, 6) and record.meta["mask_source"] == "grounded-sam"
    assert record.meta["relation"] == "hugging"

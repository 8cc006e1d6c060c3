"""SAM 2 video masks: who is subject 1, which frame each mask comes from, refusals, and `relvid preprocess`.

The tiny random models check the plumbing; whether identities survive contact needs real weights
(the ``weights`` test at the end runs when $RELVID_SAM2_PATH names a SAM 2 folder).
"""

import json
import os

import numpy as np
import pytest
import torch

from relvid.models.weights import WeightsNotFoundError
from relvid.preprocess.masks_sam2 import SAM2_ENV, Sam2VideoMasks, first_pair, load_sam2, sam2_folder, track_subjects
from relvid.preprocess.sources import Source
from relvid.preprocess.video import Clip, ClipSkipped, centre_crop
from tests.helpers.preprocess import save_tiny_grounding_dino, save_tiny_sam
from tests.helpers.sam2 import save_tiny_sam2


def box(x, w=20.0):
    return [x, 10.0, x + w, 60.0]


def clip_of(frames):
    t, h, w = frames.shape[:3]
    return Clip(frames, list(range(t)), 30.0, (h, w), centre_crop(h, w, h, w))


def test_subject_one_is_the_left_of_the_two_best_boxes_on_the_first_frame_with_two():
    detections = [torch.zeros(0, 4), torch.tensor([box(0.0)]),  # nobody, then one person
                  torch.tensor([box(70.0), box(5.0), box(40.0)]),  # best first: the third box scores lowest
                  torch.tensor([box(1.0), box(2.0)])]
    frame, boxes = first_pair(detections)
    assert frame == 2 and boxes.tolist() == [box(5.0), box(70.0)]
    assert first_pair(detections[:2]) is None


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sam2")
    return save_tiny_grounding_dino(root / "gdino"), save_tiny_sam2(root / "sam2")


@pytest.fixture(scope="module")
def sam2(folders):
    # Thresholds 0: a random detector's scores are tiny; every query counts as a detection.
    return Sam2VideoMasks.from_folders(*folders, prompt="Person", box_threshold=0.0, text_threshold=0.0, batch_size=4)


FRAMES = np.random.default_rng(0).integers(0, 255, (7, 32, 48, 3), dtype=np.uint8)
BOXES = torch.tensor([[2.0, 3.0, 20.0, 30.0], [24.0, 1.0, 46.0, 31.0]])


def test_masks_of_frame_k_come_from_frame_k(sam2):
    k = 2  # prompted on frame 2: forward to frame 6, backward to frame 0
    logits = sam2.track(FRAMES, k, BOXES)
    assert logits.shape == (2, 7, 32, 48) and torch.isfinite(logits).all()
    # The prompt frame's masks need no memory: the same as a clip that starts there.
    assert torch.equal(logits[:, k], sam2.track(FRAMES[k:], 0, BOXES)[:, 0])
    for j in (4, 0):  # change one frame after the prompt frame and one before it
        changed = FRAMES.copy()
        changed[j] = 255 - changed[j]
        other = sam2.track(changed, k, BOXES)
        assert not torch.allclose(other[:, j], logits[:, j]), j
        # SAM 2 works outwards from the prompt frame: frames on its side of j cannot see frame j.
        near = range(k, j) if j > k else range(j + 1, 7)
        for i in near:
            assert torch.equal(other[:, i], logits[:, i]), (j, i)


def test_object_of_each_box_gets_its_row_and_the_left_box_is_subject_one(sam2, tmp_path):
    logits = sam2.track(FRAMES, 1, BOXES)
    swapped = sam2.track(FRAMES, 1, BOXES.flip(0))
    torch.testing.assert_close(swapped, logits.flip(0))
    for row in (0, 1):  # on the prompt frame each object sees only its own box: row i is the object of box i
        assert torch.equal(logits[row, 1], sam2.track(FRAMES, 1, BOXES[[row, row]])[row, 1]), row
    # End to end: Grounding DINO's first frame with two boxes, left one first, prompts the tracker.
    frame, boxes = sam2.find_subjects(FRAMES)
    assert frame == 0 and boxes[0, 0] + boxes[0, 2] <= boxes[1, 0] + boxes[1, 2]
    masks = sam2(Source("c", tmp_path / "c.mp4", "x"), clip_of(FRAMES))
    assert masks.shape == (2, 7, 32, 48) and set(masks.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(masks, (sam2.track(FRAMES, frame, boxes) > 0).float())
    assert not torch.equal(masks, (sam2.track(FRAMES, frame, boxes.flip(0)) > 0).float())


def test_fewer_than_two_detections_skips_the_clip(sam2, tmp_path):
    sam2.box_threshold = 1.1  # nothing passes
    try:
        assert sam2.find_subjects(FRAMES) is None
        with pytest.raises(ClipSkipped, match=r"fewer than 2 'person\.' in each of the first 7 frames of c\.mp4"):
            sam2(Source("c", tmp_path / "c.mp4", "x"), clip_of(FRAMES))
    finally:
        sam2.box_threshold = 0.0


def test_sam2_folder_errors_name_the_folder_and_what_it_holds(tmp_path, monkeypatch):
    monkeypatch.delenv(SAM2_ENV, raising=False)
    with pytest.raises(WeightsNotFoundError, match=r"SAM 2 path not set.*facebook/sam2\.1-hiera-large.*--sam2-path"):
        sam2_folder(None)
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        sam2_folder(tmp_path / "none")
    original = tmp_path / "meta"
    original.mkdir()
    (original / "sam2.1_hiera_large.pt").write_bytes(b"")
    with pytest.raises(WeightsNotFoundError, match=r"holds sam2\.1_hiera_large\.pt, a checkpoint for Meta's sam2"):
        sam2_folder(original)
    sam1 = save_tiny_sam(tmp_path / "sam1")
    with pytest.raises(WeightsNotFoundError, match=r"model_type 'sam', not SAM 2.*--sam-path"):
        sam2_folder(sam1)
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text(json.dumps({"model_type": "sam2_video"}))
    with pytest.raises(WeightsNotFoundError, match="no weights"):
        sam2_folder(partial)
    monkeypatch.setenv(SAM2_ENV, str(partial))
    with pytest.raises(WeightsNotFoundError, match=str(partial)):  # the environment variable is the default
        sam2_folder(None)
    with pytest.raises(WeightsNotFoundError, match="Grounding DINO path not set.*--gdino-path"):
        Sam2VideoMasks.from_folders(None, partial)


def test_preprocess_own_videos_with_sam2(folders, mochi, tmp_path, monkeypatch):
    from relvid.cli import main
    from relvid.data.cache import ClipCache
    from tests.helpers.preprocess import write_video

    frames = np.random.default_rng(1).integers(0, 255, (7, 32, 48, 3), dtype=np.uint8)
    write_video(tmp_path / "videos" / "hug.mp4", frames)
    (tmp_path / "videos" / "hug.txt").write_text("A person is hugging a person.")
    out = tmp_path / "cache"
    monkeypatch.setenv(SAM2_ENV, str(folders[1]))  # the folder comes from the environment
    base = ["preprocess", "-r", "hug", "--videos", str(tmp_path / "videos"), "--mask-source", "sam2",
            "--gdino-path", str(folders[0]), "--text-threshold", "0", "--mochi-path", str(mochi), "--out", str(out),
            "--frames", "7", "--height", "32", "--width", "48", "--device", "cpu", "--no-progress"]
    # Nobody found: the clip's failure is recorded with its reason and the run says it wrote nothing.
    assert main([*base, "--box-threshold", "1.1"]) == 1
    (failure,) = ClipCache(out).manifest["failures"]
    assert failure["source"].endswith("hug.mp4") and "fewer than 2 'person.'" in failure["reason"]
    # A rerun that finds both subjects caches the clip and clears the failure.
    assert main([*base, "--box-threshold", "0"]) == 0
    cache = ClipCache(out)
    record = cache.read("hug")
    assert record.subject_masks.shape == (2, 2, 4, 6) and record.meta["mask_source"] == "sam2"
    assert cache.manifest["failures"] == [] and cache.manifest["config"]["mask_source"] == "sam2"



@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sam2_takes_its_turn_on_the_gpu(folders, sam2, tmp_path):
    from relvid.preprocess.pipeline import DeviceTurns

    maker = Sam2VideoMasks.from_folders(*folders, box_threshold=0.0, text_threshold=0.0, batch_size=4)
    turns = DeviceTurns("cuda")
    turns.use(maker)  # what the pipeline does before each clip's masks
    assert next(maker.video_model.parameters()).is_cuda and maker.device.type == "cuda"
    masks = maker(Source("c", tmp_path / "c.mp4", "x"), clip_of(FRAMES))
    assert masks.shape == (2, 7, 32, 48) and masks.device.type == "cpu"
    logits = maker.track(FRAMES, 2, BOXES)
    assert logits.device.type == "cpu"
    torch.testing.assert_close(logits, sam2.track(FRAMES, 2, BOXES), atol=1e-4, rtol=0.05)  # the CPU's result


# Identity through contact needs trained weights: two discs approach, overlap and part on a plain
# background; each mask must stay on the disc its box prompted on the first frame.
@pytest.mark.weights
@pytest.mark.skipif(not os.environ.get(SAM2_ENV), reason=f"${SAM2_ENV} names no SAM 2 folder")
def test_identities_hold_through_contact_with_real_weights():
    t, h, w, r = 25, 240, 360, 36
    yy, xx = np.mgrid[0:h, 0:w]
    xs = np.linspace(70, 290, t)  # disc A walks right, disc B left; they overlap in the middle frames
    frames = np.full((t, h, w, 3), 128, dtype=np.uint8)
    truth = np.zeros((2, t, h, w), dtype=bool)
    for i in range(t):
        a = (xx - xs[i]) ** 2 + (yy - 105) ** 2 <= r * r
        b = (xx - xs[t - 1 - i]) ** 2 + (yy - 135) ** 2 <= r * r
        frames[i][a] = (220, 50, 40)
        frames[i][b] = (40, 90, 220)  # B passes in front of A
        truth[0, i], truth[1, i] = a & ~b, b
    boxes = torch.tensor([[xs[0] - r, 105 - r, xs[0] + r, 105 + r], [xs[-1] - r, 135 - r, xs[-1] + r, 135 + r]])
    model, mean, std = load_sam2(None, "cuda" if torch.cuda.is_available() else "cpu")
    masks = (track_subjects(model, frames, 0, boxes, mean, std) > 0).numpy()

    def iou(m, g):
        return (m & g).sum() / max((m | g).sum(), 1)

    for i in range(t):
        for s in (0, 1):
            own, other = iou(masks[s, i], truth[s, i]), iou(masks[s, i], truth[1 - s, i])
            assert own > other or not masks[s, i].any(), (i, s, own, other)  # hidden for a frame: no mask
    for s in (0, 1):  # after they part, each mask is its own disc again
        assert iou(masks[s, -1], truth[s, -1]) > 0.8, s

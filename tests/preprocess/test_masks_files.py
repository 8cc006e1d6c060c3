"""User mask files: PNG folders (natural order, flat colours on black) and mask videos."""

import numpy as np
import pytest
from PIL import Image

from relvid.preprocess.mask_files import MaskFileError, load_mask_files, natural_key, palette
from relvid.preprocess.video import ClipSkipped, centre_crop
from tests.helpers.preprocess import write_video

RED, GREEN = (255, 0, 0), (0, 255, 0)


def mask_frames(count: int, h: int = 36, w: int = 64) -> np.ndarray:
    """Green subject on the left, red on the right; frame k also has k in its top-left pixel rows."""
    frames = np.zeros((count, h, w, 3), dtype=np.uint8)
    frames[:, 10:30, 4:20] = GREEN
    frames[:, 10:30, 40:60] = RED
    for k in range(count):
        frames[k, 0, : k + 1] = RED  # k+1 red pixels mark the frame's index
    return frames


def test_natural_order():
    names = ["frame10.png", "frame2.png", "frame1.png", "Frame11.png"]
    assert sorted(names, key=natural_key) == ["frame1.png", "frame2.png", "frame10.png", "Frame11.png"]


def test_png_folder_in_natural_order_with_colour_order_and_crop(tmp_path):
    frames = mask_frames(12)
    folder = tmp_path / "clip"
    folder.mkdir()
    for k, f in enumerate(frames):
        Image.fromarray(f).save(folder / f"frame{k}.png")
    crop = centre_crop(36, 64, 32, 64)  # cut 2 rows top and bottom
    masks = load_mask_files(folder, [0, 2, 10], crop, (36, 64), 32, 64)
    assert masks.shape == (2, 3, 32, 64) and set(masks.unique().tolist()) == {0.0, 1.0}
    # red sorts before green: subject 1 is the red (right) one
    assert masks[0, :, 8:28, 40:60].min() == 1 and masks[0, :, 8:28, 4:20].max() == 0
    assert masks[1, :, 8:28, 4:20].min() == 1
    # frames 0, 2 and 10 (not lexical frame10 in second place): index rows are cropped away, so check the row count
    raw = load_mask_files(folder, [0, 2, 10], centre_crop(36, 64, 36, 64), (36, 64), 36, 64)
    assert raw[0, :, 0].sum(dim=-1).tolist() == [1, 3, 11]


def test_explicit_colours_and_masks_at_another_size(tmp_path):
    folder = tmp_path / "clip"
    folder.mkdir()
    for k, f in enumerate(mask_frames(3, 72, 128)):
        Image.fromarray(f).resize((64, 36), Image.NEAREST).save(folder / f"{k:04d}.png")  # masks at half size
    masks = load_mask_files(folder, [0, 1, 2], centre_crop(72, 128, 36, 64), (72, 128), 36, 64, colours=[GREEN, RED])
    assert masks[0, :, 6:14, 2:10].min() == 1  # green first now


def test_mask_video_with_lossy_colours(tmp_path):
    path = write_video(tmp_path / "clip.mp4", mask_frames(8, 48, 64))
    masks = load_mask_files(path, list(range(7)), centre_crop(48, 64, 48, 64), (48, 64), 48, 64)
    assert masks.shape == (2, 7, 48, 64)
    assert masks[0, :, 12:28, 42:58].mean() > 0.95 and masks[1, :, 12:28, 6:18].mean() > 0.95
    assert masks[:, :, 35:, :].sum() == 0


def test_errors(tmp_path):
    folder = tmp_path / "clip"
    folder.mkdir()
    with pytest.raises(MaskFileError, match="no PNG"):
        load_mask_files(folder, [0], centre_crop(36, 64, 32, 64), (36, 64), 32, 64)
    for k, f in enumerate(mask_frames(3)):
        Image.fromarray(f).save(folder / f"{k}.png")
    with pytest.raises(MaskFileError, match="3 mask frames"):
        load_mask_files(folder, [0, 5], centre_crop(36, 64, 32, 64), (36, 64), 32, 64)
    with pytest.raises(MaskFileError, match="aspect ratio"):
        load_mask_files(folder, [0], centre_crop(64, 64, 32, 32), (64, 64), 32, 32)
    one = tmp_path / "one"
    one.mkdir()
    Image.fromarray(np.pad(np.full((4, 4, 3), 200, np.uint8), ((0, 32), (0, 60), (0, 0)))).save(one / "0.png")
    with pytest.raises(ClipSkipped, match="1 subject colour"):
        load_mask_files(one, [0], centre_crop(36, 64, 32, 64), (36, 64), 32, 64)
    assert palette(np.zeros((2, 4, 4, 3), np.uint8)) == []

"""The mask contact sheet: colours per subject, frame picks, latent masks back on the video grid."""

import numpy as np
import torch
from PIL import Image

from relvid.preprocess.contact_sheet import (
    SUBJECT_COLOURS,
    contact_sheet,
    latent_masks_to_pixels,
    overlay,
    write_contact_sheet,
)


def test_latent_frame_i_covers_video_frames_6i_minus_5_to_6i():
    latent = torch.zeros(2, 3, 2, 2)
    latent[0, 2] = 1.0
    latent[1, 0] = 1.0
    pixels = latent_masks_to_pixels(latent, 13, 16, 16, time_factor=6)
    assert pixels.shape == (2, 13, 16, 16)
    assert [int(pixels[0, t].max()) for t in range(13)] == [0] * 7 + [1] * 6
    assert [int(pixels[1, t].max()) for t in range(13)] == [1] + [0] * 12


def test_overlay_tints_each_subject_in_its_colour():
    frames = np.zeros((1, 4, 4, 3), np.uint8)
    masks = np.zeros((2, 1, 4, 4), np.float32)
    masks[0, 0, 0, 0] = masks[1, 0, 3, 3] = 1
    out = overlay(frames, masks, alpha=1.0)
    assert tuple(out[0, 0, 0]) == SUBJECT_COLOURS[0] and tuple(out[0, 3, 3]) == SUBJECT_COLOURS[1]
    assert tuple(out[0, 1, 1]) == (0, 0, 0)


def test_sheet_grid_and_files(tmp_path):
    frames = np.full((13, 20, 30, 3), 100, np.uint8)
    masks = np.ones((2, 13, 20, 30), np.float32)
    sheet = contact_sheet(frames, masks, columns=4, count=8, title="t")
    assert sheet.size == (4 * 30, 18 + 2 * (20 + 14))
    paths = write_contact_sheet(tmp_path / "a" / "s.png", frames, masks, mp4=True, title="t")
    assert [p.name for p in paths] == ["s.png", "s.mp4"] and Image.open(paths[0]).size == sheet.size


def test_large_frames_are_shrunk_to_tiles_of_at_most_424_pixels():
    frames = np.zeros((7, 480, 848, 3), np.uint8)
    sheet = contact_sheet(frames, np.zeros((2, 7, 480, 848), np.float32), columns=4, count=4)
    assert sheet.size == (4 * 424, 240 + 14)

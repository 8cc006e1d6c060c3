"""Decoding real H.264 files (.avi and .mp4) into fixed clips: frames kept, fps, crop, resize, skips."""

import numpy as np
import pytest

from relvid.preprocess.video import ClipSkipped, ClipSpec, _read_pyav, centre_crop, load_clip, read_source_frames
from tests.helpers.preprocess import frame_index_video, write_video


def grey(frames: np.ndarray) -> np.ndarray:
    """The grey level of each frame's centre, rounded to the 8-step code of frame_index_video."""
    h, w = frames.shape[1:3]
    return np.round(frames[:, h // 2, w // 2, 0] / 8).astype(int)


def test_ntu_size_avi_gives_the_first_frames_cropped_and_resized(tmp_path):
    path = write_video(tmp_path / "S001C001P001R001A058_rgb.avi", frame_index_video(16, 1080, 1920))
    clip = load_clip(path, ClipSpec(frames=13))
    assert clip.frames.shape == (13, 480, 848, 3) and clip.frames.dtype == np.uint8
    assert list(grey(clip.frames)) == list(range(13))
    assert clip.source_indices == list(range(13)) and clip.source_fps == pytest.approx(30.0)
    # 1920x1080 is a little wider than 848:480: the sides are cut, the full height kept.
    assert (clip.crop.top, clip.crop.height) == (0, 1080) and clip.crop.width == 1908 and clip.crop.left == 6


def test_mp4_at_60_fps_is_resampled_to_30(tmp_path):
    path = write_video(tmp_path / "clip.mp4", frame_index_video(30, 64, 96), fps=60)
    clip = load_clip(path, ClipSpec(frames=13, height=48, width=80))
    assert clip.source_indices == list(range(0, 26, 2))
    assert list(grey(clip.frames)) == list(range(0, 26, 2))
    assert clip.frames.shape == (13, 48, 80, 3)


def test_pyav_fallback_reads_the_same_frames_as_decord(tmp_path):
    path = write_video(tmp_path / "clip.avi", frame_index_video(10, 32, 48), fps=15)
    spec = ClipSpec(frames=7, height=32, width=48)
    frames, wanted, fps = read_source_frames(path, spec)
    frames_av, wanted_av, fps_av = _read_pyav(path, spec, None)
    assert wanted == wanted_av == [0, 0, 1, 1, 2, 2, 3] and fps == pytest.approx(fps_av) == pytest.approx(15)
    assert np.abs(frames.astype(int) - frames_av.astype(int)).max() <= 2


def test_tall_video_is_cropped_top_and_bottom():
    crop = centre_crop(1000, 848, 480, 848)
    assert (crop.top, crop.left, crop.height, crop.width) == (260, 0, 480, 848)


def test_too_short_too_small_unreadable_and_missing_are_skips_with_reasons(tmp_path):
    short = write_video(tmp_path / "short.mp4", frame_index_video(10, 64, 96))
    with pytest.raises(ClipSkipped, match="too short: 10 frames"):
        load_clip(short, ClipSpec(frames=13, height=48, width=80))
    small = write_video(tmp_path / "small.mp4", frame_index_video(13, 32, 48))
    with pytest.raises(ClipSkipped, match="too small"):
        load_clip(small, ClipSpec(frames=13, height=48, width=80))
    upscaled = load_clip(small, ClipSpec(frames=13, height=48, width=80, allow_upscale=True))
    assert upscaled.frames.shape == (13, 48, 80, 3)
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video" * 50)
    with pytest.raises(ClipSkipped, match="unreadable video"):
        load_clip(bad, ClipSpec(frames=7, height=32, width=48))
    with pytest.raises(ClipSkipped, match="not found"):
        load_clip(tmp_path / "gone.mp4", ClipSpec(frames=7, height=32, width=48))


def test_spec_rejects_frame_counts_and_sizes_the_vae_cannot_take():
    with pytest.raises(ValueError, match="6k\\+1"):
        ClipSpec(frames=60)
    with pytest.raises(ValueError, match="positive"):
        ClipSpec(height=0)
    # The multiple of the sides is the codec's (space factor x transformer patch): Mochi's 8 x 2 = 16.
    from relvid.preprocess.pipeline import check_clip_size
    from relvid.toy.codec import ToyCodec

    with pytest.raises(ValueError, match="multiple of 16"):
        check_clip_size(ToyCodec(time_factor=6, space_factor=8), ClipSpec(height=470))

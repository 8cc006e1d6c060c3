"""mp4 round trips through PyAV."""

import av
import pytest
import torch

from relvid.video_io import VideoFileError, read_video, write_mp4


def smooth_video(t=9, h=32, w=48):
    """Slow gradients: survive H.264 + yuv420p nearly unchanged."""
    tt, yy, xx = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
    r = (xx * 255 / max(w - 1, 1)).float()
    g = (yy * 255 / max(h - 1, 1)).float()
    b = (tt * 255 / max(t - 1, 1)).float().expand_as(r)
    return torch.stack([r, g, b], dim=-1).round().to(torch.uint8)  # (T, H, W, 3)


def test_mp4_round_trip(tmp_path):
    video = smooth_video()
    path = write_mp4(tmp_path / "a" / "v.mp4", video, fps=30)
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.average_rate == 30
        assert stream.codec_context.pix_fmt == "yuv420p"
    back = read_video(path)
    assert back.shape == video.shape and back.dtype == torch.uint8
    assert (back.float() - video.float()).abs().mean() < 3.0
    assert not list(tmp_path.glob("a/.*"))  # no temp file left


def test_odd_sizes_come_back_at_their_size(tmp_path):
    video = smooth_video(t=4, h=17, w=31)
    back = read_video(write_mp4(tmp_path / "odd.mp4", video))
    assert back.shape == (4, 17, 31, 3)
    assert (back.float() - video.float()).abs().mean() < 4.0


def test_bad_inputs(tmp_path):
    with pytest.raises(VideoFileError, match="uint8"):
        write_mp4(tmp_path / "x.mp4", torch.zeros(2, 8, 8, 3))
    with pytest.raises(VideoFileError, match=r"\(T, H, W, 3\)"):
        write_mp4(tmp_path / "x.mp4", torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    (tmp_path / "junk.mp4").write_bytes(b"not a video")
    with pytest.raises(VideoFileError, match="junk.mp4"):
        read_video(tmp_path / "junk.mp4")

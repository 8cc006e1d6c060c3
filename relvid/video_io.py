"""mp4 files in and out: H.264 (yuv420p) through PyAV, written atomically.

yuv420p needs even sides, so an odd-sized video is padded by repeating its last row/column and
its true size is kept in the container's comment; read_video crops it back.
"""

from __future__ import annotations

import os
import re
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from relvid.errors import InputNotFoundError, UserError
from relvid.files import atomic_path

_SIZE_TAG = re.compile(r"relvid-size=(\d+)x(\d+)")


class VideoFileError(UserError, ValueError):
    """A video file that cannot be written or read as asked."""


def _check_frames(frames: Tensor | np.ndarray) -> np.ndarray:
    array = frames.numpy() if isinstance(frames, Tensor) else np.asarray(frames)
    if array.ndim != 4 or array.shape[-1] != 3 or array.shape[0] < 1:
        raise VideoFileError(f"frames must be (T, H, W, 3) with T >= 1, got shape {tuple(array.shape)}")
    if array.dtype != np.uint8:
        raise VideoFileError(f"frames must be uint8 (0..255), got {array.dtype}; convert with "
                             "relvid.inference.generate.to_uint8_frames")
    return array


def write_mp4(path: str | os.PathLike, frames: Tensor | np.ndarray, fps: int = 30, crf: int = 16) -> Path:
    """Encode uint8 (T, H, W, 3) RGB frames to an H.264 mp4; a crash never leaves a partial file."""
    import av

    path = Path(path)
    array = _check_frames(frames)
    t, h, w, _ = array.shape
    pad_h, pad_w = h % 2, w % 2
    if pad_h or pad_w:
        array = np.pad(array, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")  # (T, H', W', 3), even
    with atomic_path(path, suffix=".mp4") as tmp:  # the muxer reads the container from the suffix
        with av.open(str(tmp), mode="w", format="mp4") as container:
            container.metadata["comment"] = f"relvid-size={w}x{h}"
            stream = container.add_stream("libx264", rate=Fraction(int(fps), 1))
            stream.width, stream.height = array.shape[2], array.shape[1]
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": str(int(crf))}
            for frame in array:
                for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():  # flush the encoder's delayed frames
                container.mux(packet)
    return path


def read_video(path: str | os.PathLike, max_frames: int | None = None) -> Tensor:
    """Decode a video file to uint8 (T, H, W, 3) RGB (odd sizes written by write_mp4 cropped back).

    max_frames: stop after that many frames (FVD clips of long reference videos).
    """
    import av

    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"video not found: {path}")
    try:
        with av.open(str(path)) as container:
            size = _SIZE_TAG.search(container.metadata.get("comment", ""))
            frames = []
            for frame in container.decode(video=0):
                frames.append(frame.to_ndarray(format="rgb24"))
                if max_frames is not None and len(frames) >= max_frames:
                    break
    except av.error.FFmpegError as err:
        raise VideoFileError(f"{path}: not a readable video ({err})") from None
    if not frames:
        raise VideoFileError(f"{path}: holds no video frames")
    array = np.stack(frames)  # (T, H, W, 3)
    if size:
        w, h = int(size[1]), int(size[2])
        array = array[:, :h, :w]
    return torch.from_numpy(np.ascontiguousarray(array))

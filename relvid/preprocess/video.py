"""Exemplar video -> a fixed clip: first N frames at 30 fps, centre-cropped to the target aspect, resized.

Decoding uses decord and falls back to PyAV when decord cannot open or read a file (or is not
installed: it is the optional ``video`` extra). Only the frames the
clip needs are decoded (an NTU video is 1920x1080; holding all of it would take gigabytes).
Frame i of the clip is the source frame on screen at time i / fps: 30 fps sources map 1:1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from relvid.errors import InputError, UserError

TIME_FACTOR = 6  # Mochi: frame counts are 6k + 1


class ClipSkipped(UserError, ValueError):
    """A source that cannot give a clip (too short, too small, unreadable); ``reason`` goes to the manifest."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class ClipSpec:
    """What every cached clip looks like."""

    frames: int = 61
    height: int = 480
    width: int = 848
    fps: float = 30.0
    allow_upscale: bool = False  # False: a source smaller than the target (after cropping) is skipped

    def __post_init__(self) -> None:
        if self.frames < 1 or (self.frames - 1) % TIME_FACTOR:
            raise InputError(f"frames={self.frames} is not 6k+1 (Mochi's VAE needs e.g. 61, 49, 25, 13, 7)")
        # The multiple the sides need depends on the codec: relvid.preprocess.pipeline.check_clip_size.
        if self.height <= 0 or self.width <= 0:
            raise InputError(f"size {self.height}x{self.width}: height and width must be positive")
        if not self.fps > 0:
            raise InputError(f"fps={self.fps} must be positive")


@dataclass(frozen=True)
class Crop:
    """The source window kept (top, left, height, width) and the scale to the target size."""

    top: int
    left: int
    height: int
    width: int
    scale: float  # target pixels per source pixel

    def map_points(self, xy: np.ndarray) -> np.ndarray:
        """Source pixel coordinates (..., 2) as (x, y) -> target pixel coordinates."""
        return (xy - np.array([self.left, self.top], dtype=np.float64)) * self.scale


@dataclass
class Clip:
    frames: np.ndarray  # (T, H, W, 3) uint8 at the target size
    source_indices: list[int]  # source frame of each clip frame
    source_fps: float
    source_size: tuple[int, int]  # (height, width)
    crop: Crop


def centre_crop(src_h: int, src_w: int, height: int, width: int) -> Crop:
    """The largest centred window of the target aspect ratio."""
    if src_w * height > width * src_h:  # source wider than target: cut the sides
        crop_h, crop_w = src_h, round(src_h * width / height)
    else:
        crop_h, crop_w = round(src_w * height / width), src_w
    return Crop((src_h - crop_h) // 2, (src_w - crop_w) // 2, crop_h, crop_w, height / crop_h)


def source_indices(frames: int, source_fps: float, fps: float) -> list[int]:
    """Source frame for each of ``frames`` output frames when resampling ``source_fps`` -> ``fps``."""
    # The frame on screen at time i / fps: the last source frame shown at or before it (1e-6 absorbs
    # rounding in rates such as 30000/1001).
    return [int(math.floor(i * source_fps / fps + 1e-6)) for i in range(frames)]


def _probe_decord(path: Path):
    """(reader, None) or (None, why decord cannot read the file)."""
    try:
        import decord
    except ImportError:
        return None, "decord is not installed (pip install 'relvid[video]'); PyAV decodes instead"
    try:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
    except (RuntimeError, decord.DECORDError) as err:
        return None, f"decord: {err}".splitlines()[0]
    return reader, None


def _read_decord(reader, wanted: list[int]) -> np.ndarray:
    batch = reader.get_batch(wanted)
    return batch.asnumpy() if hasattr(batch, "asnumpy") else np.asarray(batch)


def _read_pyav(path: Path, spec: ClipSpec, decord_error: str | None) -> tuple[np.ndarray, list[int], float]:
    """PyAV: decode the start of the first video stream sequentially, stopping at the last needed frame."""
    import av

    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as err:
        raise ClipSkipped(f"unreadable video ({decord_error or 'decord failed'}; PyAV: {err})") from None
    with container:
        if not container.streams.video:
            raise ClipSkipped("no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        if not rate:
            raise ClipSkipped("video stream has no frame rate")
        source_fps = float(rate)
        wanted = source_indices(spec.frames, source_fps, spec.fps)
        frames = []
        try:
            for frame in container.decode(stream):
                frames.append(frame.to_ndarray(format="rgb24"))
                if len(frames) > wanted[-1]:
                    break
        except av.error.FFmpegError as err:
            if not frames:
                raise ClipSkipped(f"undecodable video ({err})") from None
    if len(frames) <= wanted[-1]:
        raise ClipSkipped(_too_short(len(frames), source_fps, spec))
    return np.stack([frames[i] for i in wanted]), wanted, source_fps


def read_source_frames(path: str | Path, spec: ClipSpec) -> tuple[np.ndarray, list[int], float]:
    """(frames (N, H, W, 3) uint8 at the source size, source indices, source fps) for the first N clip frames."""
    path = Path(path)
    if not path.is_file():
        raise ClipSkipped(f"video file not found: {path}")
    reader, why = _probe_decord(path)
    if reader is not None and float(reader.get_avg_fps()) > 0:
        source_fps = float(reader.get_avg_fps())
        wanted = source_indices(spec.frames, source_fps, spec.fps)
        if wanted[-1] >= len(reader):
            raise ClipSkipped(_too_short(len(reader), source_fps, spec))
        import decord

        try:
            return _read_decord(reader, wanted), wanted, source_fps
        except (RuntimeError, decord.DECORDError) as err:
            # decord mis-sizes some streams (e.g. widths that are not a multiple of 32).
            why = f"decord: {err}".splitlines()[0]
    # decord could not open or read the file (or saw no frame rate): PyAV instead.
    return _read_pyav(path, spec, why)


def _too_short(available: int, source_fps: float, spec: ClipSpec) -> str:
    need = (spec.frames - 1) / spec.fps
    return (f"too short: {available} frames at {source_fps:g} fps ({available / source_fps:.2f} s), "
            f"{spec.frames} frames at {spec.fps:g} fps need {need:.2f} s")


def resize_frames(frames: np.ndarray, crop: Crop, height: int, width: int) -> np.ndarray:
    """Crop (T, H, W, 3) uint8 frames to ``crop`` and resize to (T, height, width, 3).

    Pillow's bilinear filter widens its support when shrinking (antialiased, like
    torch's ``antialias=True``) and runs about 3x faster than torch on a CPU for 1080p frames.
    """
    from PIL import Image

    window = frames[:, crop.top : crop.top + crop.height, crop.left : crop.left + crop.width]
    if window.shape[1:3] == (height, width):
        return np.ascontiguousarray(window)
    return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(f)).resize((width, height), Image.BILINEAR))
                     for f in window])


def load_clip(path: str | Path, spec: ClipSpec) -> Clip:
    """Decode, resample to ``spec.fps``, keep the first ``spec.frames``, centre-crop and resize."""
    raw, wanted, source_fps = read_source_frames(path, spec)
    src_h, src_w = raw.shape[1:3]
    crop = centre_crop(src_h, src_w, spec.height, spec.width)
    if not spec.allow_upscale and (crop.height < spec.height or crop.width < spec.width):
        raise ClipSkipped(
            f"too small: {src_w}x{src_h} gives a {crop.width}x{crop.height} crop, below the target "
            f"{spec.width}x{spec.height} (allow_upscale=True to enlarge it anyway)"
        )
    return Clip(resize_frames(raw, crop, spec.height, spec.width), wanted, source_fps, (src_h, src_w), crop)


def to_model_range(frames: np.ndarray) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> float (1, 3, T, H, W) in [-1, 1], the codec's input."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).float() / 127.5 - 1.0  # (T, H, W, 3)
    return x.permute(3, 0, 1, 2).unsqueeze(0)  # (1, 3, T, H, W)

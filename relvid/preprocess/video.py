"""Exemplar video -> a fixed clip: N frames at 30 fps from a start frame (the first frames by default),
centre-cropped to the target aspect, resized.

Decoding uses PyAV, which seeks to the keyframe before the clip's first frame; torchcodec and then
decord (the optional ``video`` extra) are tried when PyAV cannot open or read a file
(experiments/bench/decode.py compares them). Only the frames the clip needs are decoded (an NTU video
is 1920x1080; holding all of it would take gigabytes). Frame i of a clip starting at source frame s is
the source frame s + j, where j is the frame on screen at time i / fps: 30 fps sources map 1:1.
Which start each clip takes is relvid.preprocess.windows' concern.
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


@dataclass(frozen=True)
class VideoInfo:
    """What a video's header says: frame rate, frame count and size."""

    fps: float
    frames: int
    height: int  # 0: not known to the decoder that opened the file
    width: int


def frame_at(seconds: float, source_fps: float) -> int:
    """The source frame on screen at time ``seconds`` (the convention of ``source_indices``)."""
    return int(math.floor(seconds * source_fps + 1e-6))


def window_span(spec: ClipSpec, source_fps: float) -> int:
    """How many source frames a clip spans, from its first source frame to its last one."""
    return source_indices(spec.frames, source_fps, spec.fps)[-1] + 1


class _Unreadable(Exception):
    """One decoder could not open or read a file (the next one is tried)."""


def _first_line(name: str, err: BaseException) -> str:
    return f"{name}: {err}".splitlines()[0]


class _DecordReader:
    name = "decord"

    def __init__(self, path: Path) -> None:
        try:
            import decord
        except ImportError:
            raise _Unreadable("decord is not installed (pip install 'relvid[video]')") from None
        self._errors = (RuntimeError, decord.DECORDError)
        try:
            self._reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
        except self._errors as err:
            raise _Unreadable(_first_line("decord", err)) from None
        fps = float(self._reader.get_avg_fps())
        if not fps > 0:
            raise _Unreadable("decord: no frame rate")
        self.info = VideoInfo(fps, len(self._reader), 0, 0)  # the size would cost a decode: probe_video has it

    def read(self, wanted: list[int]) -> np.ndarray:
        try:
            batch = self._reader.get_batch(wanted)
        except self._errors as err:  # decord mis-sizes some streams (e.g. widths that are not a multiple of 32)
            raise _Unreadable(_first_line("decord", err)) from None
        return batch.asnumpy() if hasattr(batch, "asnumpy") else np.asarray(batch)


class _TorchcodecReader:
    name = "torchcodec"

    def __init__(self, path: Path) -> None:
        try:
            from torchcodec.decoders import VideoDecoder
        except Exception as err:  # not installed, or its FFmpeg libraries are missing (OSError, RuntimeError)
            raise _Unreadable(_first_line("torchcodec", err)) from None
        try:
            # exact: frame indices from a scan of the file's packets, not from the header's estimate
            self._decoder = VideoDecoder(str(path), seek_mode="exact", dimension_order="NHWC", num_ffmpeg_threads=1)
            meta = self._decoder.metadata
        except (RuntimeError, ValueError) as err:
            raise _Unreadable(_first_line("torchcodec", err)) from None
        fps = float(meta.average_fps or 0.0)
        if not fps > 0:
            raise _Unreadable("torchcodec: no frame rate")
        self.info = VideoInfo(fps, len(self._decoder), int(meta.height or 0), int(meta.width or 0))

    def read(self, wanted: list[int]) -> np.ndarray:
        try:
            return self._decoder.get_frames_at(indices=wanted).data.numpy()
        except (RuntimeError, ValueError, IndexError) as err:
            raise _Unreadable(_first_line("torchcodec", err)) from None


class _PyavReader:
    """PyAV: seeks to the keyframe before the first wanted frame and decodes on from there; a frame's index
    comes from its timestamp. Streams without usable timestamps are decoded from the start and counted."""

    name = "pyav"

    def __init__(self, path: Path) -> None:
        import av

        self._av, self._path = av, path
        try:
            with av.open(str(path)) as container:
                if not container.streams.video:
                    raise _Unreadable("PyAV: no video stream")
                stream = container.streams.video[0]
                rate = stream.average_rate or stream.guessed_rate or stream.base_rate
                if not rate:
                    raise _Unreadable("PyAV: video stream has no frame rate")
                self.info = VideoInfo(float(rate), 0, stream.codec_context.height, stream.codec_context.width)
                # The first frame's timestamp: stream.start_time is not always it (H.264 in .avi starts at 1).
                pts, count = [], 0
                for packet in container.demux(stream):
                    if packet.size:
                        count += 1
                        if count <= 16 and packet.pts is not None:
                            pts.append(packet.pts)
                        if count > 16 and stream.frames:
                            break
                self._base = min(pts) if pts else None  # None: no timestamps, frames are counted
                self.info = VideoInfo(float(rate), int(stream.frames or count), stream.codec_context.height,
                                      stream.codec_context.width)
        except (av.error.FFmpegError, OSError) as err:
            raise _Unreadable(_first_line("PyAV", err)) from None

    def _decode(self, first: int, last: int, seek: bool) -> dict[int, np.ndarray]:
        av = self._av
        out: dict[int, np.ndarray] = {}
        with av.open(str(self._path)) as container:
            stream = container.streams.video[0]
            stream.codec_context.thread_count = 1
            base = self._base or 0
            step = 1 / (self.info.fps * stream.time_base)  # timestamp units per frame
            if seek:
                container.seek(base + int(first * step), stream=stream, backward=True, any_frame=False)
            count = 0
            for frame in container.decode(stream):
                if seek:
                    if frame.pts is None:
                        raise LookupError("a frame without a timestamp")
                    index = round((frame.pts - base) / step)
                    if not out and index > first:
                        raise LookupError("the seek overshot the first frame")
                else:
                    index, count = count, count + 1
                if index >= first:
                    out[index] = frame.to_ndarray(format="rgb24")
                if index >= last:
                    break
        return out

    def read(self, wanted: list[int]) -> np.ndarray:
        av = self._av
        first, last = wanted[0], wanted[-1]
        frames: dict[int, np.ndarray] = {}
        try:
            if first > 0 and self._base is not None:
                try:
                    frames = self._decode(first, last, seek=True)
                except LookupError:
                    frames = {}
                if any(i not in frames for i in range(first, min(last, max(frames, default=-1)) + 1)):
                    frames = {}  # timestamps with gaps or repeats: count frames from the start instead
            if not frames:
                frames = self._decode(first, last, seek=False)
        except av.error.FFmpegError as err:
            if not frames:
                raise _Unreadable(_first_line("PyAV", err)) from None
        if last not in frames:
            # fewer frames than the header said: the count the decoder reached is what the video holds
            raise _ShortRead(max(frames, default=-1) + 1)
        return np.stack([frames[i] for i in wanted])


class _ShortRead(Exception):
    def __init__(self, available: int) -> None:
        super().__init__(available)
        self.available = available


# The primary decoder first; each of the others is tried when the ones before it cannot open or read a
# file (or are not installed). experiments/bench/decode.py measured the order (docs/preprocessing.md).
DECODERS = {"pyav": _PyavReader, "torchcodec": _TorchcodecReader, "decord": _DecordReader}


def open_video(path: str | Path, decoders: tuple[str, ...] | None = None):
    """A reader (``.info``, ``.read(indices)``) from the first decoder that opens ``path``; ClipSkipped
    with every decoder's reason when none does."""
    path = Path(path)
    if not path.is_file():
        raise ClipSkipped(f"video file not found: {path}")
    why = []
    for name in decoders or tuple(DECODERS):
        try:
            return DECODERS[name](path)
        except _Unreadable as err:
            why.append(str(err))
    raise ClipSkipped(f"unreadable video ({'; '.join(why)})")


def probe_video(path: str | Path) -> VideoInfo:
    """Frame rate, frame count and size of a video from its header (PyAV; ClipSkipped when unreadable)."""
    return open_video(path, ("pyav",)).info


def _past_end(path: Path, start: int, info: VideoInfo) -> str:
    return (f"{path.name}: the clip starts at frame {start} ({start / info.fps:.2f} s), past the video's end "
            f"({info.frames} frames, {info.frames / info.fps:.2f} s)")


def read_source_frames(path: str | Path, spec: ClipSpec, start: int = 0,
                       decoders: tuple[str, ...] | None = None) -> tuple[np.ndarray, list[int], float]:
    """(frames (N, H, W, 3) uint8 at the source size, source indices, source fps) for the ``spec.frames``
    clip frames from source frame ``start`` on (0: the first frames)."""
    path = Path(path)
    if start < 0:
        raise ClipSkipped(f"{path.name}: start frame {start} is negative")
    order = list(decoders or DECODERS)
    why: list[str] = []
    while order:
        try:
            reader = open_video(path, tuple(order))
        except ClipSkipped as err:
            raise ClipSkipped("; ".join([*why, err.reason]) if why else err.reason) from None
        order = order[order.index(reader.name) + 1:]
        info = reader.info
        wanted = [start + i for i in source_indices(spec.frames, info.fps, spec.fps)]
        if start >= info.frames:
            raise ClipSkipped(_past_end(path, start, info))
        if wanted[-1] >= info.frames:
            raise ClipSkipped(_too_short(info.frames, info.fps, spec, start))
        try:
            return reader.read(wanted), wanted, info.fps
        except _ShortRead as err:
            raise ClipSkipped(_too_short(err.available, info.fps, spec, start)) from None
        except _Unreadable as err:
            why.append(str(err))  # e.g. decord mis-sizes some streams: the next decoder reads it
    raise ClipSkipped(f"unreadable video ({'; '.join(why)})")


def _read_pyav(path: Path, spec: ClipSpec, decord_error: str | None = None,
               start: int = 0) -> tuple[np.ndarray, list[int], float]:
    """The clip's frames read with PyAV alone."""
    return read_source_frames(path, spec, start, decoders=("pyav",))


def _too_short(available: int, source_fps: float, spec: ClipSpec, start: int = 0) -> str:
    need = (spec.frames - 1) / spec.fps
    where = f" from frame {start} ({start / source_fps:.2f} s) on" if start else ""
    return (f"too short: {available} frames at {source_fps:g} fps ({available / source_fps:.2f} s), "
            f"{spec.frames} frames at {spec.fps:g} fps need {need:.2f} s{where}")


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


def load_clip(path: str | Path, spec: ClipSpec, start: int = 0) -> Clip:
    """Decode, resample to ``spec.fps``, keep ``spec.frames`` from source frame ``start`` on (0: the first
    frames), centre-crop and resize."""
    raw, wanted, source_fps = read_source_frames(path, spec, start)
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

"""Which source frames each clip takes: a start (frame or time), the window where the two subjects are
closest, and several windows per video.

A *window* is the run of source frames one clip is read from: ``spec.frames`` frames at ``spec.fps``
from a start frame ``s``, i.e. source frames ``s + source_indices(...)`` (``s`` to ``s + span - 1``
with ``span = window_span(spec, fps)``).

- ``start`` (the default): the window begins at ``start_frame``, or at the frame on screen at
  ``start_time`` seconds, or at frame 0 when neither is given (the first frames).
- ``closest``: the window whose *mean inter-subject distance* is smallest. The distance in a source
  frame is the one between the two subjects' centres in pixels: a skeleton's centre is the mean of its
  tracked joints (NTU: the two bodies seen in the most frames), a mask's centre its centroid (mask
  files). A window's mean is taken over its clip frames where both subjects are present; a window
  qualifies when both are present in at least half of them. Ties go to the earlier window; a given
  start is the earliest frame searched.
- ``count`` windows per video: in ``start`` mode they begin ``stride`` seconds apart (default: the
  clip's duration, back to back); in ``closest`` mode they are the ``count`` non-overlapping windows
  with the smallest means, picked greedily, closest first. Either way they are numbered in time
  order, and the clip of window k (1-based) is ``<source id>_w<k>``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from relvid.errors import InputError
from relvid.preprocess.sources import Source
from relvid.preprocess.video import ClipSkipped, ClipSpec, Crop, VideoInfo, frame_at, probe_video, source_indices

WINDOW_MODES = ("start", "closest")


@dataclass(frozen=True)
class WindowSettings:
    """How every source's windows are chosen (a source's own start, from the captions CSV, wins)."""

    mode: str = "start"  # start | closest
    start_frame: int | None = None  # the first source frame (start mode) or the earliest one searched (closest)
    start_time: float | None = None  # the same in seconds
    count: int = 1  # windows per video; more than 1 gives clips <source id>_w1, _w2, ...
    stride: float | None = None  # seconds between window starts (start mode); None: the clip's duration

    def __post_init__(self) -> None:
        if self.mode not in WINDOW_MODES:
            raise InputError(f"preprocess.window={self.mode!r}: use one of {', '.join(WINDOW_MODES)}")
        if self.start_frame is not None and self.start_time is not None:
            raise InputError("give one start: --start-frame (preprocess.start_frame) or --start "
                             "(preprocess.start_time), not both")
        if self.start_frame is not None and self.start_frame < 0:
            raise InputError(f"--start-frame {self.start_frame} (preprocess.start_frame): use a frame >= 0")
        if self.start_time is not None and not self.start_time >= 0:
            raise InputError(f"--start {self.start_time} (preprocess.start_time): use seconds >= 0")
        if self.count < 1:
            raise InputError(f"--windows {self.count} (preprocess.windows): use 1 or more windows per video")
        if self.stride is not None and not self.stride > 0:
            raise InputError(f"--window-stride {self.stride} (preprocess.window_stride): use seconds > 0")

    def for_source(self, source: Source) -> WindowSettings:
        """These settings with the source's own start (captions CSV), when it has one."""
        if source.start_frame is None and source.start_time is None:
            return self
        return WindowSettings(self.mode, source.start_frame, source.start_time, self.count, self.stride)

    def request(self) -> str:
        """How the windows are asked for, as recorded with each clip (``meta.window``) and compared on reruns."""
        if self.start_frame is not None:
            start = f"start_frame={self.start_frame}"
        elif self.start_time is not None:
            start = f"start_time={self.start_time:g}s"
        else:
            start = ""
        parts = ["closest" if self.mode == "closest" else (start or "first"), *([start] if self.mode == "closest"
                                                                                and start else [])]
        if self.count > 1:
            parts.append(f"windows={self.count}")
            if self.mode == "start" and self.stride is not None:
                parts.append(f"stride={self.stride:g}s")
        return ",".join(parts)

    @property
    def needs_probe(self) -> bool:
        """False when the start frame is known without opening the video (today's default: frame 0)."""
        return self.mode != "start" or self.start_time is not None or self.count > 1


def clip_ids(source: Source, settings: WindowSettings) -> list[str]:
    """The clip id of each of the source's windows."""
    if settings.count == 1:
        return [source.clip_id]
    return [f"{source.clip_id}_w{k}" for k in range(1, settings.count + 1)]


@dataclass(frozen=True)
class Window:
    start: int  # first source frame
    how: str  # the request (WindowSettings.request)
    distance: float | None = None  # closest mode: the window's mean inter-subject distance in pixels


def _where(source: Source, settings: WindowSettings) -> str:
    own = source.start_frame is not None or source.start_time is not None
    return "its row of the captions CSV" if own else "--start/--start-frame (preprocess.start_time/start_frame)"


def first_start(source: Source, settings: WindowSettings, info: VideoInfo) -> int:
    """The start frame the settings give (0 without one), or ClipSkipped naming the file when it lies past
    the video's end."""
    if settings.start_frame is not None:
        start, said = settings.start_frame, f"frame {settings.start_frame}"
    elif settings.start_time is not None:
        start = frame_at(settings.start_time, info.fps)
        said = f"{settings.start_time:g} s (frame {start} at {info.fps:g} fps)"
    else:
        return 0
    if start >= info.frames:
        raise ClipSkipped(f"{source.video}: the start {said}, from {_where(source, settings)}, is past the video's "
                          f"end ({info.frames} frames, {info.frames / info.fps:.2f} s). Fix: a start below "
                          f"{info.frames / info.fps:.2f} s")
    return start


def _centre(xy: np.ndarray, ok: np.ndarray) -> np.ndarray | None:
    return xy[ok].mean(axis=0) if ok.any() else None


def skeleton_distances(path: Path) -> np.ndarray:
    """Per skeleton frame, the pixel distance between the two subjects' centres (NaN where one is missing)."""
    from relvid.preprocess.ntu import parse_skeleton

    seq = parse_skeleton(path)
    ids = seq.body_ids()[:2]
    out = np.full(len(seq.frames), np.nan)
    if len(ids) < 2:
        return out
    for f, bodies in enumerate(seq.frames):
        centres = {}
        for b in bodies:
            if b.body_id in ids:
                centres[b.body_id] = _centre(b.colour_xy, np.isfinite(b.colour_xy).all(axis=1) & (b.tracking > 0))
        if all(centres.get(i) is not None for i in ids):
            out[f] = float(np.linalg.norm(centres[ids[0]] - centres[ids[1]]))
    return out


def _mask_frame_count(masks: Path) -> int:
    from relvid.preprocess.mask_files import IMAGE_SUFFIXES

    if masks.is_dir():
        return sum(1 for p in masks.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    return probe_video(masks).frames


def mask_distances(masks: Path, info: VideoInfo, colours: list[tuple[int, int, int]] | None = None,
                   chunk: int = 32) -> np.ndarray:
    """Per source frame, the pixel distance between the two subjects' mask centroids (NaN where one is empty),
    from mask files read at a reduced size, ``chunk`` frames at a time."""
    from relvid.preprocess.mask_files import load_mask_files

    count = min(info.frames, _mask_frame_count(masks))
    scale = min(1.0, 128 / max(info.height, 1))
    h, w = max(8, round(info.height * scale)), max(8, round(info.width * scale))
    full = Crop(0, 0, info.height, info.width, h / info.height)
    out = np.full(info.frames, np.nan)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64) / scale
    for lo in range(0, count, chunk):
        frames = list(range(lo, min(count, lo + chunk)))
        m = load_mask_files(masks, frames, full, (info.height, info.width), h, w, colours).numpy() > 0.5
        area = m.sum(axis=(2, 3))  # (2, T)
        with np.errstate(invalid="ignore", divide="ignore"):
            cy = (m * ys).sum(axis=(2, 3)) / area
            cx = (m * xs).sum(axis=(2, 3)) / area
        out[lo: lo + len(frames)] = np.hypot(cx[0] - cx[1], cy[0] - cy[1])  # NaN where a mask is empty
    return out


def closest_starts(distances: np.ndarray, offsets: list[int], frames: int, first: int, count: int) -> list[
        tuple[int, float]]:
    """Up to ``count`` non-overlapping window starts >= ``first`` with the smallest mean distance (see the module
    docstring), as (start, mean) in time order. ``offsets`` are a window's source frames relative to its start."""
    span = offsets[-1] + 1
    d = np.full(max(frames, len(distances)) + span, np.nan)
    d[: len(distances)] = distances
    d[frames:] = np.nan  # frames the video does not have
    starts = np.arange(first, frames - span + 1)
    if not len(starts):
        return []
    values = d[starts[:, None] + np.asarray(offsets)[None, :]]  # (candidates, clip frames)
    present = np.isfinite(values).sum(axis=1)
    with np.errstate(invalid="ignore"):
        means = np.where(present >= math.ceil(len(offsets) / 2),
                         np.nansum(values, axis=1) / np.maximum(present, 1), np.inf)
    picked: list[tuple[int, float]] = []
    for i in np.argsort(means, kind="stable"):  # stable: the earlier window wins a tie
        if not np.isfinite(means[i]) or len(picked) == count:
            break
        if all(abs(int(starts[i]) - s) >= span for s, _ in picked):
            picked.append((int(starts[i]), float(means[i])))
    return sorted(picked)


class WindowPlanner:
    """The windows of one source, worked out once (the video's header, and its skeleton or mask files in
    ``closest`` mode) and shared by the jobs of its clips."""

    def __init__(self, source: Source, settings: WindowSettings, spec: ClipSpec,
                 mask_colours: list[tuple[int, int, int]] | None = None) -> None:
        self.source, self.settings, self.spec = source, settings.for_source(source), spec
        self.mask_colours = mask_colours
        self._windows: list[Window] | None = None

    def window(self, k: int) -> Window:
        """Window ``k`` (0-based) of the source, or ClipSkipped saying why it has none."""
        s = self.settings
        if not s.needs_probe and s.start_frame is None:
            return Window(0, s.request())
        if self._windows is None:
            self._windows = self._plan()
        if k >= len(self._windows):
            raise ClipSkipped(self._missing(k))
        return self._windows[k]

    def _missing(self, k: int) -> str:
        s = self.settings
        if s.mode == "closest":
            return (f"{self.source.video.name}: window {k + 1} of {s.count}: only {len(self._windows)} "
                    "non-overlapping window(s) have both subjects in at least half of their frames")
        return f"{self.source.video.name}: window {k + 1} of {s.count} ends past the video's end ({self._why_end})"

    def _plan(self) -> list[Window]:
        s, spec = self.settings, self.spec
        info = probe_video(self.source.video)
        offsets = source_indices(spec.frames, info.fps, spec.fps)
        span = offsets[-1] + 1
        first = first_start(self.source, s, info)
        if s.mode == "start":
            stride = frame_at(s.stride, info.fps) if s.stride is not None else span
            stride = max(1, stride)
            starts = [first + k * stride for k in range(s.count)]
            fits = [st for st in starts if st + span <= info.frames] or starts[:1]  # the first: load_clip says why
            self._why_end = (f"{info.frames} frames at {info.fps:g} fps; windows of {span} frames every {stride} "
                             f"from frame {first}")
            return [Window(st, s.request()) for st in fits]
        distances = self._distances(info)
        picked = closest_starts(distances, offsets, info.frames, first, s.count)
        if not picked:
            raise ClipSkipped(f"{self.source.video.name}: --window closest: no window of {span} frames from frame "
                              f"{first} on has both subjects in at least half of its frames")
        return [Window(st, s.request(), mean) for st, mean in picked]

    def _distances(self, info: VideoInfo) -> np.ndarray:
        source = self.source
        if source.skeleton is not None and source.skeleton.is_file():
            return skeleton_distances(source.skeleton)
        if source.masks is not None:
            return mask_distances(source.masks, info, self.mask_colours)
        raise ClipSkipped(f"{source.video.name}: --window closest needs where the subjects are: an NTU skeleton "
                          "or mask files (--mask-source files --masks DIR); this video has neither")

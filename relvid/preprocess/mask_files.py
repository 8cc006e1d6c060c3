"""User-supplied subject masks: a folder of PNG frames or a mask video, one flat colour per subject on black.

Frames are in natural order (frame2 before frame10, unlike a plain sort). Mask frame k belongs to
source video frame k, at the source video's size or any size of the same aspect ratio; the clip's
crop and resize are applied to them as to the video. Subject order is the order of the colours:
given explicitly, or the two most frequent non-black colours sorted by (R, G, B) descending (red
before green before blue). Lossy mask videos are read by nearest palette colour.

PNG folders are checked, so that a mistake never silently moves or merges masks: numbered frames must
have no gap (a missing ``mask3.png`` would shift every later mask by a frame), and a PNG may hold no
third colour besides the two subjects and their blends with black or each other (anti-aliased edges).
With explicit colours (--mask-colors) any other colour is read as background instead, in PNGs and
mask videos alike: that is how to use mask files that label more than the two subjects.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from relvid.errors import UserError
from relvid.preprocess.video import ClipSkipped, Crop

IMAGE_SUFFIXES = (".png",)
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm")
BLACK_LEVEL = 40  # a pixel whose channels are all at or below this is background
STRAY_DISTANCE = 64.0  # RGB distance from every subject colour (and their blends) of another colour
STRAY_MIN_PIXELS = 8  # fewer stray pixels than this (and than 0.2% of the foreground) are noise
_DIGITS = re.compile(r"(\d+)")


class MaskFileError(UserError, ValueError):
    """Mask files that cannot give two subject masks for a clip."""


def natural_key(name: str) -> list:
    """Sort key treating digit runs as numbers: frame2 < frame10."""
    return [int(part) if part.isdigit() else part.lower() for part in _DIGITS.split(name)]


def mask_source_for(video: Path, masks_root: Path) -> Path | None:
    """The mask folder or mask video for ``video`` under ``masks_root``: ``<stem>/`` or ``<stem>.<ext>``."""
    folder = masks_root / video.stem
    if folder.is_dir():
        return folder
    for suffix in VIDEO_SUFFIXES:
        if (masks_root / f"{video.stem}{suffix}").is_file():
            return masks_root / f"{video.stem}{suffix}"
    return None


def _check_numbering(folder: Path, files: list[Path]) -> None:
    """Numbered PNGs (the last digit run of the name) must count up without a gap or a repeat."""
    numbers = []
    for p in files:
        runs = _DIGITS.findall(p.stem)
        if not runs:
            return  # unnumbered names: natural order is all there is
        numbers.append(int(runs[-1]))
    seen: dict[int, str] = {}
    for number, p in zip(numbers, files, strict=True):
        if number in seen:
            raise MaskFileError(f"{folder}: {seen[number]} and {p.name} are both mask frame {number}. Fix: keep one "
                                "PNG per source video frame")
        seen[number] = p.name
    missing = sorted(set(range(min(numbers), max(numbers) + 1)) - set(numbers))
    if missing:
        shown = ", ".join(str(n) for n in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise MaskFileError(f"{folder}: mask frame {shown} missing (PNGs numbered {min(numbers)}..{max(numbers)}): "
                            "every later mask would belong to the wrong video frame. Fix: add the missing PNG "
                            "(an all-black one where no subject is visible)")


def _read_png_folder(folder: Path, wanted: list[int]) -> tuple[np.ndarray, list[str]]:
    """(T, H, W, 3) mask frames for source frames ``wanted``, and their file names."""
    from PIL import Image

    files = sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES),
                   key=lambda p: natural_key(p.name))
    if not files:
        raise MaskFileError(f"{folder}: no PNG mask frames")
    _check_numbering(folder, files)
    if wanted[-1] >= len(files):
        raise MaskFileError(f"{folder}: {len(files)} mask frames, the clip needs source frames up to {wanted[-1]} "
                            "(one mask PNG per source video frame)")
    frames = np.stack([np.asarray(Image.open(files[i]).convert("RGB")) for i in wanted])  # (T, H, W, 3)
    return frames, [files[i].name for i in wanted]


def _read_mask_video(path: Path, wanted: list[int]) -> np.ndarray:
    import av

    frames = []
    try:
        with av.open(str(path)) as container:
            for frame in container.decode(video=0):
                frames.append(frame.to_ndarray(format="rgb24"))
                if len(frames) > wanted[-1]:
                    break
    except (av.error.FFmpegError, OSError) as err:
        raise MaskFileError(f"{path}: unreadable mask video ({err})") from None
    if len(frames) <= wanted[-1]:
        raise MaskFileError(f"{path}: {len(frames)} mask frames, the clip needs source frames up to {wanted[-1]}")
    return np.stack([frames[i] for i in wanted])


def palette(frames: np.ndarray, count: int = 2) -> list[tuple[int, int, int]]:
    """The ``count`` most frequent non-black colours (quantized to 16 levels), sorted (R, G, B) descending."""
    pixels = frames.reshape(-1, 3)
    fg = pixels[(pixels > BLACK_LEVEL).any(axis=1)]
    if len(fg) == 0:
        return []
    q = np.minimum((fg.astype(np.int32) + 8) // 16 * 16, 255)  # lossy videos: near colours pool together
    keys, counts = np.unique(q[:, 0] << 16 | q[:, 1] << 8 | q[:, 2], return_counts=True)
    top = keys[np.argsort(-counts, kind="stable")[:count]]
    colours = [tuple(int((k >> s) & 255) for s in (16, 8, 0)) for k in top]
    return sorted(colours, reverse=True)


def _segment_distance(pixels: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """RGB distance of (..., 3) pixels to the colour segment a-b (the blends of a and b)."""
    ab = b - a
    t = np.clip(((pixels - a) @ ab) / max(float(ab @ ab), 1e-6), 0.0, 1.0)
    return np.linalg.norm(pixels - (a + t[..., None] * ab), axis=-1)


def stray_distance(frame: np.ndarray, colours: list[tuple[int, int, int]]) -> np.ndarray:
    """(H, W) RGB distance of each pixel to the nearest subject colour or blend (with black or each other):
    anti-aliased edges lie near 0, a colour of its own far from it."""
    px = frame.astype(np.float32)
    ref = [np.array(c, dtype=np.float32) for c in colours]
    black = np.zeros(3, dtype=np.float32)
    segments = [(c, black) for c in ref] + [(ref[i], ref[j]) for i in range(len(ref)) for j in range(i + 1, len(ref))]
    return np.min([_segment_distance(px, a, b) for a, b in segments], axis=0)


def _check_stray_colours(frames: np.ndarray, names: list[str], folder: Path,
                         colours: list[tuple[int, int, int]]) -> None:
    """Refuse a PNG holding a colour that is neither subject (it would be merged into the nearest one)."""
    for frame, name in zip(frames, names, strict=True):
        fg = (frame > BLACK_LEVEL).any(axis=-1)
        stray = fg & (stray_distance(frame, colours) > STRAY_DISTANCE)
        count = int(stray.sum())
        if count >= max(STRAY_MIN_PIXELS, 0.002 * int(fg.sum())):
            values, counts = np.unique(frame[stray].reshape(-1, 3), axis=0, return_counts=True)
            colour = tuple(int(v) for v in values[counts.argmax()])
            raise MaskFileError(
                f"{folder / name}: colour {colour} ({count} pixels) is neither subject colour ({colours[0]} and "
                f"{colours[1]}): the masks hold more colours than the two subjects. Fix: give the two subject "
                "colours with --mask-colors 'R,G,B;R,G,B' (any other colour is then read as background), or "
                "repaint the mask files with two colours on black")


def split_colours(frames: np.ndarray, colours: list[tuple[int, int, int]], ignore_others: bool = False) -> np.ndarray:
    """(T, H, W, 3) colour masks -> (S, T, H, W) bool: each foreground pixel goes to its nearest colour;
    with ``ignore_others``, pixels of another colour (see stray_distance) are background."""
    ref = np.array(colours, dtype=np.int32)  # (S, 3)
    out = np.zeros((len(colours), *frames.shape[:3]), dtype=bool)
    for t, frame in enumerate(frames):  # per frame: a 1080p clip at once would take gigabytes
        dist = ((frame.astype(np.int32)[None] - ref[:, None, None]) ** 2).sum(-1)  # (S, H, W)
        nearest = dist.argmin(axis=0)
        fg = (frame > BLACK_LEVEL).any(axis=-1)
        if ignore_others:
            fg &= stray_distance(frame, colours) <= STRAY_DISTANCE
        for s in range(len(colours)):
            out[s, t] = fg & (nearest == s)
    return out


def load_mask_files(
    source: Path, wanted: list[int], crop: Crop, source_size: tuple[int, int], height: int, width: int,
    colours: list[tuple[int, int, int]] | None = None,
) -> torch.Tensor:
    """(2, T, height, width) float masks for the clip's source frames ``wanted``."""
    source = Path(source)
    names = None
    if source.is_dir():
        frames, names = _read_png_folder(source, wanted)
    elif source.is_file():
        frames = _read_mask_video(source, wanted)
    else:
        raise ClipSkipped(f"mask files not found: {source}")
    explicit = bool(colours)
    colours = [tuple(int(v) for v in c) for c in colours] if colours else palette(frames)
    if len(colours) < 2:
        raise ClipSkipped(f"{source}: {len(colours)} subject colour(s) found on black, a relation needs 2 "
                          "(one flat colour per subject)")
    if names is not None and not explicit:
        _check_stray_colours(frames, names, source, colours[:2])
    masks = split_colours(frames, colours[:2], ignore_others=explicit)  # (2, T, h, w) at the mask files' size
    src_h, src_w = source_size
    m_h, m_w = masks.shape[-2:]
    if abs(m_w * src_h - src_w * m_h) > max(src_h, src_w):  # not the same aspect ratio (1 px slack)
        raise MaskFileError(f"{source}: masks are {m_w}x{m_h}, the video is {src_w}x{src_h}: they must have the "
                            "video's aspect ratio")
    # The clip's crop window in mask pixels (the masks may be stored at another size).
    sy, sx = m_h / src_h, m_w / src_w
    top, left = round(crop.top * sy), round(crop.left * sx)
    window = masks[..., top : top + max(1, round(crop.height * sy)), left : left + max(1, round(crop.width * sx))]
    x = torch.from_numpy(np.ascontiguousarray(window)).float()  # (2, T, h', w')
    return F.interpolate(x, size=(height, width), mode="nearest")  # nearest: masks stay binary

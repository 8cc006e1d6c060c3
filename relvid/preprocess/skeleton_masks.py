"""Subject masks from NTU skeletons: each person's limbs as thick segments, torso and head filled, dilated.

Identity comes from Kinect's bodyID: the two ids seen in the most frames are the two subjects (a
spurious third body, tracked for a few frames, is dropped); subject 1 is the one further left on
average. Joints are mapped through the same crop and resize as the video, so masks line up with
the cached frames; joints outside the frame simply draw outside it.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

from relvid.preprocess.ntu import BONES, Body, SkeletonSequence
from relvid.preprocess.video import ClipSkipped, Crop

SPINE_BASE, SPINE_SHOULDER, HEAD = 0, 20, 3
TORSO = (4, 8, 16, 12)  # ShoulderLeft, ShoulderRight, HipRight, HipLeft
LIMB_WIDTH = 0.35  # limb thickness, as a fraction of the torso length (spine base to spine shoulder)
HEAD_RADIUS = 0.4
_FAR = 1e4  # clamp far-away joints so that drawing never overflows
COLOUR_SIZE = (1080, 1920)  # (h, w) of Kinect v2's colour camera, the frame of colorX/colorY


def pick_subjects(seq: SkeletonSequence, frame_indices: list[int]) -> tuple[int, int]:
    """The two bodyIDs of the clip's frames, left one first; ClipSkipped when fewer than two appear."""
    window = [seq.frames[i] for i in frame_indices if i < len(seq.frames)]
    if not window:
        raise ClipSkipped(f"skeleton {seq.path.name} has {len(seq.frames)} frames, none in the clip's "
                          f"frames {frame_indices[0]}..{frame_indices[-1]}")
    counts: dict[int, int] = {}
    xs: dict[int, list[float]] = {}
    for bodies in window:
        for b in bodies:
            counts[b.body_id] = counts.get(b.body_id, 0) + 1
            x = b.colour_xy[SPINE_BASE, 0]
            if np.isfinite(x):
                xs.setdefault(b.body_id, []).append(float(x))
    if len(counts) < 2:
        raise ClipSkipped(f"skeleton {seq.path.name}: {len(counts)} body in the clip's frames, a relation needs 2")
    two = sorted(counts, key=lambda i: -counts[i])[:2]  # stable: first appearance breaks ties
    two.sort(key=lambda i: np.mean(xs.get(i, [0.0])))
    return two[0], two[1]


def _usable(body: Body, crop: Crop, colour_scale: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    xy = crop.map_points(body.colour_xy * np.array(colour_scale))  # (25, 2) target pixels
    ok = np.isfinite(xy).all(axis=1) & (body.tracking > 0)
    return np.clip(np.nan_to_num(xy), -_FAR, _FAR), ok


def draw_body(body: Body, crop: Crop, height: int, width: int, colour_scale: tuple[float, float] = (1.0, 1.0),
              dilation: int = 0) -> np.ndarray:
    """One body's silhouette as a (height, width) bool array, grown by ``dilation`` pixels.

    ``colour_scale`` maps colour-space x, y to source pixels. The growth is drawn into the shapes
    (wider limbs, larger head, outlined torso), far cheaper than a max filter over every frame.
    """
    xy, ok = _usable(body, crop, colour_scale)
    image = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(image)
    if ok[SPINE_BASE] and ok[SPINE_SHOULDER]:
        torso = float(np.linalg.norm(xy[SPINE_BASE] - xy[SPINE_SHOULDER]))
    else:
        torso = 0.08 * height  # a typical torso at NTU's framing when the spine is lost
    torso = max(torso, 4.0)
    limb = max(2, round(LIMB_WIDTH * torso)) + 2 * dilation
    if all(ok[j] for j in TORSO):
        draw.polygon([tuple(xy[j]) for j in TORSO], fill=255, outline=255, width=max(1, 2 * dilation))
    r = limb / 2
    for a, b in BONES:
        if ok[a] and ok[b]:
            draw.line([tuple(xy[a]), tuple(xy[b])], fill=255, width=limb)
            for j in (a, b):  # round joints, so thick segments meet without gaps
                draw.ellipse([xy[j][0] - r, xy[j][1] - r, xy[j][0] + r, xy[j][1] + r], fill=255)
    if ok[HEAD]:
        rh = HEAD_RADIUS * torso + dilation
        draw.ellipse([xy[HEAD][0] - rh, xy[HEAD][1] - rh, xy[HEAD][0] + rh, xy[HEAD][1] + rh], fill=255)
    return np.asarray(image) > 0


def skeleton_masks(
    seq: SkeletonSequence, frame_indices: list[int], crop: Crop, height: int, width: int, dilation: int | None = None,
    source_size: tuple[int, int] = COLOUR_SIZE,
) -> torch.Tensor:
    """(2, T, height, width) float masks in {0, 1}, one per subject, for the clip's source frames.

    Joints are in Kinect's 1920x1080 colour space; a video of another ``source_size`` (h, w), e.g. a
    downscaled copy of NTU, gets them scaled to its pixels.

    A frame past the skeleton's end, or where a subject is not tracked, leaves that subject empty.
    """
    if dilation is None:
        dilation = max(1, round(0.01 * width))  # ~8 px at 848: a margin for clothes and hair
    first, second = pick_subjects(seq, frame_indices)
    colour_scale = (source_size[1] / COLOUR_SIZE[1], source_size[0] / COLOUR_SIZE[0])
    out = np.zeros((2, len(frame_indices), height, width), dtype=bool)
    for t, i in enumerate(frame_indices):
        if i >= len(seq.frames):
            continue
        for body in seq.frames[i]:
            if body.body_id in (first, second):
                out[0 if body.body_id == first else 1, t] |= draw_body(body, crop, height, width, colour_scale,
                                                                        dilation)
    return torch.from_numpy(out).float()

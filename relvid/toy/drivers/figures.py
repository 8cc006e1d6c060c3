"""Pictures of toy clips: a labelled PNG grid of keyframes (pillow), one band per method."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from relvid.eval.metrics import keyframe_indices

ZOOM = 3
LABEL_HEIGHT = 14


def keyframe_strip(video: Tensor, n: int = 7) -> np.ndarray:
    """uint8 (T, H, W, 3) -> (H, n * (W + 1), 3): n evenly spaced frames side by side."""
    frames = [video[i].numpy() for i in keyframe_indices(video.shape[0], n)]
    gap = np.full((video.shape[1], 1, 3), 40, dtype=np.uint8)
    return np.concatenate([x for f in frames for x in (f, gap)][:-1], axis=1)


def save_grid(path: str | Path, bands: list[tuple[str, list[tuple[str, Tensor]]]], n_frames: int = 7) -> Path:
    """bands: [(title, [(caption, video uint8 (T, H, W, 3)), ...]), ...] -> a PNG, each row a clip."""
    rows: list[tuple[str, np.ndarray]] = []
    for title, clips in bands:
        for caption, video in clips:
            rows.append((f"{title}: {caption}", keyframe_strip(video, n_frames)))
    if not rows:
        raise ValueError("save_grid: nothing to draw")
    width = max(r.shape[1] for _, r in rows) * ZOOM
    height = sum(r.shape[0] * ZOOM + LABEL_HEIGHT for _, r in rows)
    canvas = Image.new("RGB", (width, height), (20, 20, 20))
    draw = ImageDraw.Draw(canvas)
    y = 0
    for label, strip in rows:
        draw.text((2, y + 1), label, fill=(230, 230, 230))
        y += LABEL_HEIGHT
        img = Image.fromarray(strip).resize((strip.shape[1] * ZOOM, strip.shape[0] * ZOOM), Image.NEAREST)
        canvas.paste(img, (0, y))
        y += strip.shape[0] * ZOOM
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def as_uint8(video: Tensor) -> Tensor:
    """float (3, T, H, W) in [-1, 1] -> uint8 (T, H, W, 3)."""
    return ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).contiguous()

"""Real inputs for the preprocessing fault tests: a video folder with captions and PNG mask folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from tests.helpers.preprocess import write_video

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def mask_frame(h: int, w: int, extra: tuple[int, int, int] | None = None) -> np.ndarray:
    """Red subject on the left, green on the right (and a third colour in the middle when ``extra``)."""
    m = np.zeros((h, w, 3), np.uint8)
    m[h // 8 : h - h // 8, w // 16 : w // 3] = RED
    m[h // 8 : h - h // 8, 2 * w // 3 : w - w // 16] = GREEN
    if extra is not None:
        m[h // 4 : h - h // 4, w // 3 + 4 : 2 * w // 3 - 4] = extra
    return m


def write_mask_folder(folder: Path, count: int, h: int, w: int, skip: tuple[int, ...] = (),
                      extra: dict[int, tuple[int, int, int]] | None = None) -> Path:
    """PNG masks ``mask<k>.png`` for k < count, leaving out ``skip``; frame k holds ``extra[k]`` too."""
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(count):
        if k not in skip:
            Image.fromarray(mask_frame(h, w, (extra or {}).get(k))).save(folder / f"mask{k}.png")
    return folder


def write_own_videos(root: Path, stems: tuple[str, ...] = ("walk",), frames: int = 13, h: int = 64,
                     w: int = 112) -> tuple[Path, Path]:
    """``root/videos/<stem>.mp4`` (+ ``.txt`` caption) and ``root/masks/<stem>/``; returns (videos, masks)."""
    videos, masks = root / "videos", root / "masks"
    for k, stem in enumerate(stems):
        pixels = np.random.default_rng(k).integers(0, 255, (frames, h, w, 3), dtype=np.uint8)
        write_video(videos / f"{stem}.mp4", pixels)
        (videos / f"{stem}.txt").write_text("A person is walking towards a person.\n")
        write_mask_folder(masks / stem, frames, h, w)
    return videos, masks

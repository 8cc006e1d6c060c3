"""Pictures of the analyses with pillow: labelled tile grids, heat maps over video frames, annotated
tables of numbers, and their mp4s."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from relvid.files import atomic_path

LABEL = 12  # pixels of a text line
BACKGROUND = (20, 20, 20)
INK = (230, 230, 230)
# A dark-to-bright colour ramp (black, purple, orange, yellow) for values in [0, 1].
_RAMP = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float64)


def colormap(values: Tensor | np.ndarray, low: float | None = None, high: float | None = None) -> np.ndarray:
    """(...) values -> (..., 3) uint8 on the ramp, scaled from [low, high] (default: the values' range)."""
    x = np.asarray(values.detach().cpu() if isinstance(values, Tensor) else values, dtype=np.float64)
    low = float(x.min()) if low is None else low
    high = float(x.max()) if high is None else high
    t = np.clip((x - low) / max(high - low, 1e-12), 0.0, 1.0) * (len(_RAMP) - 1)
    i = np.minimum(t.astype(int), len(_RAMP) - 2)
    frac = (t - i)[..., None]
    return (_RAMP[i] * (1 - frac) + _RAMP[i + 1] * frac).round().astype(np.uint8)


def rgb_image(values: Tensor) -> np.ndarray:
    """(h, w, 3) float in [0, 1] -> uint8."""
    return (values.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def upscale(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of an (h, w, 3) uint8 image: each token stays a visible block."""
    return np.asarray(Image.fromarray(image).resize((width, height), Image.NEAREST))


def overlay(frame: np.ndarray, heat: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """A (H, W, 3) uint8 frame under a coloured (h, w, 3) uint8 heat map, resized to the frame (bilinear)."""
    big = np.asarray(Image.fromarray(heat).resize((frame.shape[1], frame.shape[0]), Image.BILINEAR))
    return (frame.astype(np.float64) * (1 - alpha) + big * alpha).round().astype(np.uint8)


def tile_grid(rows: list[tuple[str, list[tuple[str, np.ndarray]]]], tile: int = 96, title: str = "") -> Image.Image:
    """rows: [(row label, [(caption, (h, w, 3) uint8), ...]), ...] -> one picture, every tile resized to
    `tile` pixels high (nearest neighbour), captions above the tiles, row labels above each row."""
    scaled = [(label, [(c, upscale(img, tile, max(1, round(tile * img.shape[1] / img.shape[0])))) for c, img in tiles])
              for label, tiles in rows]
    width = max(sum(img.shape[1] + 4 for _, img in tiles) for _, tiles in scaled) + 4
    width = max(width, 8 * max([len(title)] + [len(label) for label, _ in scaled]))
    height = (LABEL + 2 if title else 0) + sum(2 * LABEL + 6 + tile for _ in scaled)
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    y = 2
    if title:
        draw.text((4, y), title, fill=INK)
        y += LABEL + 2
    for label, tiles in scaled:
        draw.text((4, y), label, fill=INK)
        y += LABEL
        x = 4
        for caption, img in tiles:
            draw.text((x, y), caption[: max(1, img.shape[1] // 6)], fill=(170, 170, 170))
            canvas.paste(Image.fromarray(img), (x, y + LABEL + 2))
            x += img.shape[1] + 4
        y += LABEL + 6 + tile
    return canvas


def number_table(title: str, row_labels: list[str], col_labels: list[str], values: np.ndarray,
                 low: float = 0.0, high: float = 1.0, cell: int = 34) -> Image.Image:
    """A heat map of (rows, cols) values with labels; each cell also shows its value when it is wide enough."""
    values = np.asarray(values, dtype=np.float64)
    cell_w = max(8, cell if len(col_labels) <= 16 else 12)
    left = 8 * max(len(r) for r in row_labels) + 8
    width = max(left + cell_w * len(col_labels) + 8, 8 * len(title) + 8)
    height = 2 * LABEL + 8 + cell * len(row_labels) + 4
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 2), title, fill=INK)
    top = 2 * LABEL + 6
    step = max(1, len(col_labels) // 16)
    for j, name in enumerate(col_labels):
        if j % step == 0:
            draw.text((left + j * cell_w + 2, LABEL + 4), name, fill=(170, 170, 170))
    colours = colormap(np.nan_to_num(values, nan=low), low, high)
    for i, name in enumerate(row_labels):
        draw.text((4, top + i * cell + cell // 3), name, fill=INK)
        for j in range(len(col_labels)):
            x0, y0 = left + j * cell_w, top + i * cell
            draw.rectangle([x0, y0, x0 + cell_w - 2, y0 + cell - 2], fill=tuple(int(c) for c in colours[i, j]))
            if cell_w >= 30 and np.isfinite(values[i, j]):
                shade = (0, 0, 0) if (values[i, j] - low) / max(high - low, 1e-12) > 0.6 else INK
                draw.text((x0 + 2, y0 + cell // 3), f"{values[i, j]:.2f}", fill=shade)
    return canvas


def stack(images: list[Image.Image]) -> Image.Image:
    """Pictures one under another."""
    width = max(i.width for i in images)
    canvas = Image.new("RGB", (width, sum(i.height for i in images)), BACKGROUND)
    y = 0
    for image in images:
        canvas.paste(image, (0, y))
        y += image.height
    return canvas


def save_png(image: Image.Image, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path


def save_mp4(frames: list[Image.Image], path: str | Path, fps: int) -> Path:
    """Pictures as an mp4, each placed on a canvas of the largest one's size."""
    from relvid.video_io import write_mp4

    width, height = max(f.width for f in frames), max(f.height for f in frames)
    canvases = []
    for frame in frames:
        canvas = Image.new("RGB", (width, height), BACKGROUND)
        canvas.paste(frame.convert("RGB"), (0, 0))
        canvases.append(np.asarray(canvas))
    return write_mp4(path, torch.from_numpy(np.stack(canvases)), fps=fps)  # (T, H, W, 3)

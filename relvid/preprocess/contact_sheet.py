"""A look at the masks: frames with subject 1 in red and subject 2 in blue, as a PNG grid (and an mp4)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from relvid.errors import InputError, UserError

SUBJECT_COLOURS = ((255, 40, 40), (40, 120, 255))  # subject 1 red, subject 2 blue
ALPHA = 0.5


class MaskSheetError(UserError, FileNotFoundError):
    """A cached clip whose source video cannot be re-read for its mask sheet."""


def latent_masks_to_pixels(latent_masks: torch.Tensor, frames: int, height: int, width: int,
                           time_factor: int) -> torch.Tensor:
    """(S, f, h, w) latent masks -> (S, frames, height, width): latent frame i spans video frames t(i-1)+1..ti."""
    s, f, h, w = latent_masks.shape
    which = [0] + [1 + (k - 1) // time_factor for k in range(1, frames)]  # latent frame of each video frame
    x = latent_masks.float()[:, which]  # (S, frames, h, w)
    return F.interpolate(x, size=(height, width), mode="nearest")


def overlay(frames: np.ndarray, masks: torch.Tensor | np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """Tint uint8 (T, H, W, 3) frames with (2, T, H, W) masks in [0, 1], one colour per subject."""
    out = frames.astype(np.float32)
    m = np.asarray(masks, dtype=np.float32)
    for k, colour in enumerate(SUBJECT_COLOURS[: m.shape[0]]):
        a = alpha * m[k][..., None]  # (T, H, W, 1)
        out = out * (1 - a) + np.array(colour, dtype=np.float32) * a
    return out.round().clip(0, 255).astype(np.uint8)


def contact_sheet(frames: np.ndarray, masks, columns: int = 4, count: int = 8, title: str = "",
                  max_tile_width: int = 424) -> Image.Image:
    """A grid of ``count`` evenly spaced overlaid frames (first and last included), labelled with their index;
    tiles wider than ``max_tile_width`` are shrunk (a 848-wide clip gives 424-wide tiles)."""
    tinted = overlay(frames, masks)
    total = len(tinted)
    picks = sorted({round(i * (total - 1) / max(1, count - 1)) for i in range(min(count, total))})
    h, w = tinted.shape[1:3]
    shrink = max(1, -(-w // max_tile_width))  # integer factor: tiles stay sharp
    h, w = h // shrink, w // shrink
    rows = -(-len(picks) // columns)
    top = 18 if title else 0
    sheet = Image.new("RGB", (columns * w, rows * (h + 14) + top), (0, 0, 0))
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((4, 2), title, fill=(255, 255, 255))
    for n, i in enumerate(picks):
        x, y = (n % columns) * w, top + (n // columns) * (h + 14)
        sheet.paste(Image.fromarray(tinted[i]).resize((w, h), Image.BILINEAR), (x, y))
        draw.text((x + 4, y + h + 1), f"frame {i}", fill=(255, 255, 255))
    return sheet


def write_contact_sheet(path: str | Path, frames: np.ndarray, masks, mp4: bool = False, fps: float = 30.0,
                        title: str = "") -> list[Path]:
    """Write the PNG sheet (and ``<stem>.mp4`` of every overlaid frame when ``mp4``); returns the paths."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    contact_sheet(frames, masks, title=title).save(path)
    written = [path]
    if mp4:
        from relvid.video_io import write_mp4

        written.append(Path(write_mp4(path.with_suffix(".mp4"), overlay(frames, masks), fps=fps)))
    return written


def mask_sheet(cache_dir: str | Path, clip_id: str | None = None, out: str | Path | None = None,
               mp4: bool = False) -> list[Path]:
    """`relvid mask-sheet`: a cached clip's frames (re-read from its source video) under its latent masks."""
    from relvid.data.cache import ClipCache
    from relvid.preprocess.video import ClipSpec, load_clip

    cache = ClipCache(cache_dir)
    ids = cache.clip_ids()
    if not ids:
        raise InputError(f"{cache_dir} holds no clips")
    clip_id = clip_id or ids[0]
    record = cache.read(clip_id)
    spec_cfg = cache.manifest.get("config", {}).get("spec")
    if not spec_cfg:
        raise InputError(f"{cache.manifest_path} has no clip spec (not written by `relvid preprocess`)")
    spec = ClipSpec(**{**spec_cfg, "allow_upscale": True})
    source = Path(record.meta["source"])
    if not source.is_file():
        where = "" if source.is_absolute() else f" from {Path.cwd()} (a relative path)"
        raise MaskSheetError(
            f"{cache.path(clip_id)}: field 'meta.source': the source video {source} of clip {clip_id} is not "
            f"found{where}. Fix: put the video back at that path, or run `relvid mask-sheet` from the folder "
            "`relvid preprocess` ran in (caches written now record absolute paths)")
    start = record.meta.get("frame_range", "0-0").split("-")[0]
    clip = load_clip(source, spec, int(start) if start.isdigit() else 0)  # the clip's window, not frame 0
    t = int(record.meta["codec_factors"].split(",")[0])
    masks = latent_masks_to_pixels(record.subject_masks, spec.frames, spec.height, spec.width, t)
    path = Path(out or Path(cache_dir) / "sheets" / f"{clip_id}.png")
    return write_contact_sheet(path, clip.frames, masks.numpy(), mp4=mp4, fps=spec.fps,
                               title=f"{clip_id}: subject 1 red, subject 2 blue (latent masks)")

"""What to preprocess: exemplar videos with their captions (and skeletons or mask files), from NTU or a folder."""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

from relvid import relations
from relvid.errors import InputError, InputNotFoundError
from relvid.preprocess.mask_files import mask_source_for, natural_key
from relvid.preprocess.ntu import choose, filter_samples, index_ntu

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


@dataclass(frozen=True)
class Source:
    """One exemplar video to cache."""

    clip_id: str
    video: Path
    caption: str
    skeleton: Path | None = None
    masks: Path | None = None  # PNG folder or mask video (--mask-source files)


def safe_clip_id(stem: str) -> str:
    """A file-name-safe clip id from a video's stem."""
    cleaned = _UNSAFE.sub("_", stem).strip("._") or "clip"
    return cleaned if cleaned[0].isalnum() else f"c{cleaned}"


def ntu_sources(
    root: str | Path,
    relation: str,
    count: int = 20,
    seed: int = 0,
    setups: list[int] | None = None,
    cameras: list[int] | None = None,
    performers: list[int] | None = None,
    replications: list[int] | None = None,
    skeleton_root: str | Path | None = None,
    masks_root: str | Path | None = None,
) -> list[Source]:
    """A seeded choice of ``count`` NTU samples of the relation's action, captioned with its training prompt."""
    rel = relations.resolve(relation)
    samples = index_ntu(root, skeleton_root)
    matching = filter_samples(samples, rel.ntu_action_id, setups, cameras, performers, replications)
    if not matching:
        raise InputNotFoundError(
            f"no {rel.ntu_action} ({rel.name}) videos under {root} match the filters "
            f"(found {len(samples)} NTU videos in all): check --ntu-root and --setups/--cameras/--performers"
        )
    masks_root = Path(masks_root) if masks_root else None
    return [
        Source(str(s.name), s.video, rel.training_prompt, s.skeleton,
               mask_source_for(s.video, masks_root) if masks_root else None)
        for s in choose(matching, count, seed)
    ]


def read_captions_csv(path: str | Path) -> dict[str, str]:
    """``video,caption`` rows (a header row naming them) -> {file name or stem: caption}."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"captions CSV not found: {path}")
    with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheet exports start with a BOM
        rows = list(csv.DictReader(f))
    if not rows or not {"video", "caption"} <= set(rows[0]):
        raise InputError(f"{path}: needs a header row with columns 'video' and 'caption'")
    return {row["video"].strip(): row["caption"].strip() for row in rows}


def folder_sources(
    videos: str | Path, captions_csv: str | Path | None = None, masks_root: str | Path | None = None
) -> list[Source]:
    """Every video in ``videos`` with its caption: ``<stem>.txt`` beside it, or a row of ``captions_csv``."""
    folder = Path(videos).expanduser()
    if not folder.is_dir():
        raise InputNotFoundError(f"--videos {folder} is not a folder of videos")
    table = read_captions_csv(captions_csv) if captions_csv else {}
    files = sorted((p for p in folder.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES),
                   key=lambda p: natural_key(p.name))
    if not files:
        raise InputNotFoundError(f"no videos ({', '.join(VIDEO_SUFFIXES)}) in {folder}")
    out, missing, seen = [], [], {}
    masks_root = Path(masks_root) if masks_root else None
    for video in files:
        caption = table.get(video.name) or table.get(video.stem)
        txt = video.with_suffix(".txt")
        if caption is None and txt.is_file():
            caption = txt.read_text(encoding="utf-8").strip()
        if not caption:
            missing.append(video.name)
            continue
        clip_id = safe_clip_id(video.stem)
        if clip_id in seen:
            raise InputError(f"{video.name} and {seen[clip_id]} give the same clip id {clip_id!r}: rename one")
        seen[clip_id] = video.name
        out.append(Source(clip_id, video, caption, None, mask_source_for(video, masks_root) if masks_root else None))
    if missing:
        raise InputError(f"no caption for {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}: put one in "
                         "<video stem>.txt beside each video, or a 'video,caption' row in --captions-csv")
    return out

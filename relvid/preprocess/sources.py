"""What to preprocess: exemplar videos with their captions (and skeletons or mask files, and for your own videos
an optional start each), from NTU or a folder."""

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
    start_frame: int | None = None  # this video's own start (captions CSV column start_frame) ...
    start_time: float | None = None  # ... or in seconds (column start_time); None: the run's setting


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


START_COLUMNS = ("start_frame", "start_time")


def _csv_rows(path: str | Path) -> tuple[Path, list[dict[str, str]]]:
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"captions CSV not found: {path}")
    with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheet exports start with a BOM
        rows = list(csv.DictReader(f))
    if not rows or not {"video", "caption"} <= set(rows[0]):
        raise InputError(f"{path}: needs a header row with columns 'video' and 'caption'")
    return path, rows


def read_captions_csv(path: str | Path) -> dict[str, str]:
    """``video,caption`` rows (a header row naming them) -> {file name or stem: caption}."""
    _, rows = _csv_rows(path)
    return {row["video"].strip(): row["caption"].strip() for row in rows}


def read_csv_starts(path: str | Path) -> dict[str, tuple[int | None, float | None]]:
    """{file name or stem: (start_frame, start_time)} from the optional ``start_frame`` / ``start_time`` columns
    of the captions CSV, for the rows that fill one (an empty cell: the run's own start)."""
    path, rows = _csv_rows(path)
    out = {}
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        cells = {k: (row.get(k) or "").strip() for k in START_COLUMNS}
        if not any(cells.values()):
            continue
        where = f"{path}: line {line} ({row['video'].strip()})"
        if all(cells.values()):
            raise InputError(f"{where}: fill one of start_frame and start_time, not both")
        try:
            if cells["start_frame"]:
                frame = int(cells["start_frame"])
                if frame < 0:
                    raise ValueError
                out[row["video"].strip()] = (frame, None)
            else:
                seconds = float(cells["start_time"].removesuffix("s"))
                if not seconds >= 0:
                    raise ValueError
                out[row["video"].strip()] = (None, seconds)
        except ValueError:
            raise InputError(f"{where}: start_frame must be a whole frame number >= 0 and start_time seconds >= 0 "
                             f"(e.g. 75 or 2.5), got {cells['start_frame'] or cells['start_time']!r}") from None
    return out


def folder_sources(
    videos: str | Path, captions_csv: str | Path | None = None, masks_root: str | Path | None = None
) -> list[Source]:
    """Every video in ``videos`` with its caption: ``<stem>.txt`` beside it, or a row of ``captions_csv``."""
    folder = Path(videos).expanduser()
    if not folder.is_dir():
        raise InputNotFoundError(f"--videos {folder} is not a folder of videos")
    table = read_captions_csv(captions_csv) if captions_csv else {}
    starts = read_csv_starts(captions_csv) if captions_csv else {}
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
        start_frame, start_time = starts.get(video.name) or starts.get(video.stem) or (None, None)
        out.append(Source(clip_id, video, caption, None, mask_source_for(video, masks_root) if masks_root else None,
                          start_frame, start_time))
    if missing:
        raise InputError(f"no caption for {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}: put one in "
                         "<video stem>.txt beside each video, or a 'video,caption' row in --captions-csv")
    return out

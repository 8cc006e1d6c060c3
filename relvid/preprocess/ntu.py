"""NTU RGB+D 60/120: sample names, a local index, filters, a seeded choice, and the .skeleton parser.

Names are ``SsssCcccPpppRrrrAaaa`` (setup, camera, performer, replication, action). RGB videos are
``<name>_rgb.avi``; skeletons ``<name>.skeleton``, text, Kinect v2 joints per tracked body.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from relvid.errors import InputError, InputNotFoundError, UserError

NUM_JOINTS = 25
# Kinect v2 bones as joint pairs (see the joint order in the module docstring of skeleton_masks).
BONES = (
    (0, 1), (1, 20), (20, 2), (2, 3), (20, 4), (4, 5), (5, 6), (6, 7), (7, 21), (7, 22), (20, 8), (8, 9),
    (9, 10), (10, 11), (11, 23), (11, 24), (0, 12), (12, 13), (13, 14), (14, 15), (0, 16), (16, 17),
    (17, 18), (18, 19),
)
_NAME = re.compile(r"S(\d{3})C(\d{3})P(\d{3})R(\d{3})A(\d{3})")


class SkeletonError(UserError, ValueError):
    """A .skeleton file that cannot be parsed (truncated, non-numeric, wrong joint count)."""


@dataclass(frozen=True, order=True)
class NtuName:
    setup: int
    camera: int
    performer: int
    replication: int
    action: int

    @classmethod
    def parse(cls, text: str) -> NtuName:
        match = _NAME.search(Path(text).name)
        if match is None:
            raise InputError(f"{text!r} is not an NTU RGB+D name (SsssCcccPpppRrrrAaaa, e.g. S001C001P001R001A058)")
        return cls(*(int(g) for g in match.groups()))

    def __str__(self) -> str:
        return (f"S{self.setup:03d}C{self.camera:03d}P{self.performer:03d}"
                f"R{self.replication:03d}A{self.action:03d}")


@dataclass(frozen=True)
class NtuSample:
    name: NtuName
    video: Path
    skeleton: Path | None  # None: the dataset has no skeleton for this sample


def index_ntu(root: str | Path, skeleton_root: str | Path | None = None) -> list[NtuSample]:
    """Every ``*_rgb.avi`` under ``root`` (recursively) with its ``.skeleton`` if one exists under
    ``skeleton_root`` (default: ``root``), sorted by name."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise InputNotFoundError(f"NTU root {root} is not a folder: point --ntu-root at your NTU RGB+D copy "
                                "(the folder holding the *_rgb.avi files, e.g. nturgb+d_rgb/)")
    skeleton_root = Path(skeleton_root).expanduser() if skeleton_root else root
    skeletons = {}
    for path in skeleton_root.rglob("*.skeleton"):
        try:
            skeletons[NtuName.parse(path.name)] = path
        except ValueError:
            continue  # a foreign file in the tree is not ours to judge
    samples = []
    for video in root.rglob("*_rgb.avi"):
        try:
            name = NtuName.parse(video.name)
        except ValueError:
            continue
        samples.append(NtuSample(name, video, skeletons.get(name)))
    return sorted(samples, key=lambda s: s.name)


def filter_samples(
    samples: list[NtuSample],
    action: int | None = None,
    setups: list[int] | None = None,
    cameras: list[int] | None = None,
    performers: list[int] | None = None,
    replications: list[int] | None = None,
) -> list[NtuSample]:
    """Samples matching every given filter (None = any)."""
    def keep(n: NtuName) -> bool:
        return ((action is None or n.action == action) and (not setups or n.setup in setups)
                and (not cameras or n.camera in cameras) and (not performers or n.performer in performers)
                and (not replications or n.replication in replications))

    return [s for s in samples if keep(s.name)]


def choose(samples: list[NtuSample], count: int, seed: int) -> list[NtuSample]:
    """A seeded choice of ``count`` samples (all when fewer), returned in name order."""
    if count <= 0 or count >= len(samples):
        return list(samples)
    picked = random.Random(seed).sample(range(len(samples)), count)
    return [samples[i] for i in sorted(picked)]


@dataclass
class Body:
    body_id: int
    colour_xy: np.ndarray  # (25, 2) float: joint pixels in the 1920x1080 RGB frame
    tracking: np.ndarray  # (25,) int: 0 not tracked, 1 inferred, 2 tracked


@dataclass
class SkeletonSequence:
    path: Path
    frames: list[list[Body]]  # per frame, the bodies Kinect reported (0, 1, 2 or more)

    def body_ids(self) -> list[int]:
        """Body ids by the number of frames they appear in (most first), ties by first appearance."""
        counts: dict[int, int] = {}
        for bodies in self.frames:
            for b in bodies:
                counts[b.body_id] = counts.get(b.body_id, 0) + 1
        return sorted(counts, key=lambda i: -counts[i])  # sorted is stable: first appearance breaks ties


def parse_skeleton(path: str | Path) -> SkeletonSequence:
    """Parse an NTU ``.skeleton`` file; SkeletonError names the file and the line that is wrong."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"skeleton file not found: {path}")
    lines = path.read_text(encoding="ascii", errors="replace").split("\n")
    pos = 0

    def fields(expect: int | None = None) -> list[str]:
        nonlocal pos
        while pos < len(lines) and not lines[pos].strip():
            pos += 1
        if pos >= len(lines):
            raise SkeletonError(f"{path}: file ends early (truncated?) after line {pos}")
        parts = lines[pos].split()
        pos += 1
        if expect is not None and len(parts) < expect:
            raise SkeletonError(f"{path}: line {pos} has {len(parts)} fields, expected {expect}")
        return parts

    def integer(parts: list[str], what: str) -> int:
        try:
            return int(parts[0])
        except ValueError:
            raise SkeletonError(f"{path}: line {pos}: {what} {parts[0]!r} is not an integer") from None

    frame_count = integer(fields(1), "frame count")
    frames: list[list[Body]] = []
    for _ in range(frame_count):
        bodies = []
        for _ in range(integer(fields(1), "body count")):
            info = fields(10)
            body_id = integer(info, "bodyID")
            joint_count = integer(fields(1), "joint count")
            if joint_count != NUM_JOINTS:
                raise SkeletonError(f"{path}: line {pos}: {joint_count} joints, NTU skeletons have {NUM_JOINTS}")
            rows = [fields(12) for _ in range(NUM_JOINTS)]
            try:
                values = np.array([[float(v) for v in row[:12]] for row in rows])  # (25, 12)
            except ValueError as err:
                raise SkeletonError(f"{path}: near line {pos}: non-numeric joint value ({err})") from None
            bodies.append(Body(body_id, values[:, 5:7].copy(), values[:, 11].astype(int)))
        frames.append(bodies)
    return SkeletonSequence(path, frames)

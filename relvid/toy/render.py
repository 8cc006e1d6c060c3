"""Procedural clips: two shapes on a dark background moving along a relation's (or generic) tracks.

A clip is a pure function of its seed and staging: `render_clip(kind, s1, s2, seed, staging)` draws
the background, sizes and trajectory with one torch.Generator. Tracks are subject centres in pixels,
(T, 2) as (x, y). Subject 1 is drawn over subject 2; the returned masks are the visible pixels of each.

Staging says how freely a clip is filmed. FREE (the default: pretraining clips, the judge's ground
truth) uses every random range in full and puts the clip anywhere in the frame. EXEMPLAR_STAGING is
how the customization exemplars are filmed, as NTU RGB+D films its two-person actions: a fixed
camera, the two actors on their marks in the middle of the frame, each take a little different.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from relvid.toy.world import COLOURS, FRAMES, GENERIC_MOTIONS, RELATIONS, SHAPES, SIZE, Subject

RADIUS_RANGE = (3.6, 4.4)  # subject "radius" in px (half the bounding box)
MARGIN = 5.0  # centres stay in [MARGIN, SIZE - 1 - MARGIN]
CONTACT = 8.5  # centre distance of two touching subjects
GENERIC_MAX_SHIFT = 5.0  # generic motion moves a subject by at most this many px
# Relations are staged as NTU's two-person clips are filmed: subject 1 starts on the left, subject 2
# on the right, and the relation plays out along a near-horizontal axis (within this many degrees).
AXIS_JITTER_DEG = 20.0


@dataclass(frozen=True)
class Staging:
    """How freely a clip is filmed.

    spread: the share of every random range a clip draws from, around the range's middle (1: the
        whole range; 0.2: a fifth of it). It narrows start points, distances, speeds, tilts, sizes
        and the background together.
    centre: None places the clip anywhere inside the frame; a number centres the box around both
        tracks in the frame, give or take up to that many px on each axis.
    """

    spread: float = 1.0
    centre: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.spread <= 1.0:
            raise ValueError(f"Staging.spread must be in [0, 1], got {self.spread}")
        if self.centre is not None and self.centre < 0:
            raise ValueError(f"Staging.centre must be None or >= 0 px, got {self.centre}")


FREE = Staging()
# The exemplars: on their marks in mid-frame (+- 0.5 px), each draw within a fifth of its range.
EXEMPLAR_STAGING = Staging(spread=0.2, centre=0.5)


@dataclass
class Clip:
    video: Tensor  # (3, T, H, W) in [-1, 1]
    masks: Tensor  # (2, T, H, W) visible pixels of subject 1 and 2, {0, 1}
    tracks: Tensor  # (2, T, 2) subject centres (x, y) in px
    radii: tuple[float, float]
    background: tuple[float, float, float]


class _Draw:
    """A clip's random draws: a seeded torch.Generator, each range narrowed to the staging's spread."""

    def __init__(self, seed: int, staging: Staging) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.staging = staging

    def unit(self, n: int = 1) -> Tensor:
        """n draws in [0, 1], narrowed around 0.5."""
        u = torch.rand(n, generator=self.generator)
        if self.staging.spread == 1.0:
            return u  # as drawn: FREE clips are bit-identical to those the base was pretrained on
        return 0.5 + (u - 0.5) * self.staging.spread

    def uniform(self, lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(self.unit()[0])


def _point(g: _Draw) -> Tensor:
    lo, hi = MARGIN, SIZE - 1 - MARGIN
    return torch.tensor([g.uniform(lo, hi), g.uniform(lo, hi)])


def _place(t1: Tensor, t2: Tensor, g: _Draw) -> tuple[Tensor, Tensor] | None:
    """Shift both tracks by one offset that keeps them inside the frame (None if none does): a
    random one, or the one that centres them (give or take staging.centre px)."""
    both = torch.cat([t1, t2])  # (2T, 2)
    # A centred clip may use the frame up to its edges (a subject touches the edge, never crosses it):
    # the longest staged relation, pushing, spans 21.5 px along a near-horizontal axis.
    margin = MARGIN if g.staging.centre is None else RADIUS_RANGE[1]
    lo = margin - both.min(dim=0).values  # smallest allowed shift per axis
    hi = SIZE - 1 - margin - both.max(dim=0).values
    if bool((lo > hi).any()):
        return None
    if g.staging.centre is None:
        shift = lo + (hi - lo) * g.unit(2)
    else:
        middle = (both.min(dim=0).values + both.max(dim=0).values) / 2  # (2,)
        jitter = 2 * torch.rand(2, generator=g.generator) - 1  # in full: the marks are +- centre px
        shift = (SIZE - 1) / 2 - middle + jitter * g.staging.centre
        shift = torch.maximum(torch.minimum(shift, hi), lo)  # the marks never push a subject out
    return t1 + shift, t2 + shift


def _direction(g: _Draw) -> Tensor:
    a = g.uniform(0.0, 2 * math.pi)
    return torch.tensor([math.cos(a), math.sin(a)])


def _tilt(g: _Draw) -> float:
    """A random tilt of the staging axis in radians, within +- AXIS_JITTER_DEG."""
    return math.radians(g.uniform(-AXIS_JITTER_DEG, AXIS_JITTER_DEG))


def _axis(g: _Draw) -> Tensor:
    """Unit vector from subject 1's side to subject 2's: rightwards, tilted by up to AXIS_JITTER_DEG."""
    a = _tilt(g)
    return torch.tensor([math.cos(a), math.sin(a)])


def _ease(s: Tensor) -> Tensor:
    """Smooth start and stop (smoothstep) on s in [0, 1]."""
    return s * s * (3 - 2 * s)


def _time(n: int = FRAMES) -> Tensor:
    return torch.linspace(0.0, 1.0, n)  # (T,)


def _segment(a: Tensor, b: Tensor, s: Tensor) -> Tensor:
    return a[None] + (b - a)[None] * s[:, None]  # (T, 2)


def _static(p: Tensor) -> Tensor:
    return p[None].expand(FRAMES, 2).clone()


# --- relation tracks: each returns (track1, track2) or None to ask for a redraw ---------------------

def _approaching(g: _Draw):
    p2 = _point(g)
    p1 = p2 - _axis(g) * g.uniform(16.0, 20.0)
    end = p2 + (p1 - p2) / (p1 - p2).norm() * CONTACT
    return _segment(p1, end, _ease(_time())), _static(p2)


def _moving_apart(g: _Draw):
    t1, t2 = _approaching(g)
    return t1.flip(0), t2


def _orbiting(g: _Draw):
    centre = torch.tensor([g.uniform(15.0, 16.0), g.uniform(15.0, 16.0)])
    radius = g.uniform(9.0, 10.0)
    start = math.pi + _tilt(g)  # left of the partner
    turn = 2 * math.pi * g.uniform(0.95, 1.1)  # one way round (clockwise on screen, y points down)
    angle = start + turn * _time()
    t1 = centre[None] + radius * torch.stack([angle.cos(), angle.sin()], dim=1)
    return t1, _static(centre)


def _following(g: _Draw):
    u = _axis(g)
    gap = g.uniform(9.0, 10.0)
    length = g.uniform(10.0, 12.0)
    lead_start = _point(g)
    s = _time()  # constant speed: the follower keeps its distance
    t2 = _segment(lead_start, lead_start + u * length, s)
    return t2 - u[None] * gap, t2


def _pushing(g: _Draw):
    u = _axis(g)
    p2 = _point(g)
    p1 = p2 - u * g.uniform(14.0, 15.0)
    contact = p2 - u * CONTACT
    half = FRAMES // 2
    s1 = _ease(torch.linspace(0.0, 1.0, half + 1))
    s2 = _ease(torch.linspace(0.0, 1.0, FRAMES - half))
    push = g.uniform(6.5, 7.5)
    t1 = torch.cat([_segment(p1, contact, s1), _static(contact)[: FRAMES - half - 1]])
    t2 = torch.cat([_static(p2)[:half], _segment(p2, p2 + u * push, s2)])
    return t1, t2


def _swapping(g: _Draw):
    a = _point(g)
    b = a + _axis(g) * g.uniform(15.0, 20.0)
    d = (b - a) / (b - a).norm()
    n = torch.tensor([-d[1], d[0]])
    s = _ease(_time())
    bump = (torch.sin(math.pi * s) * g.uniform(5.0, 6.0))[:, None] * n[None]
    return _segment(a, b, s) + bump, _segment(b, a, s) - bump


def _bouncing(g: _Draw):
    a = _point(g)
    b = a + _axis(g) * g.uniform(18.0, 21.5)
    mid = (a + b) / 2
    d = (b - a) / (b - a).norm()
    meet = CONTACT - 1.0  # overlap a little at the meeting: each subject travels >= 5 px
    meet1, meet2 = mid - d * meet / 2, mid + d * meet / 2
    s = _ease(1 - (2 * _time() - 1).abs())  # 0 -> 1 (meet at the middle frame) -> 0
    return _segment(a, meet1, s), _segment(b, meet2, s)


RELATION_TRACKS = {
    "approaching": _approaching,
    "moving_apart": _moving_apart,
    "orbiting": _orbiting,
    "following": _following,
    "pushing": _pushing,
    "swapping": _swapping,
    "bouncing": _bouncing,
}
assert set(RELATION_TRACKS) == set(RELATIONS)


def _generic_one(motion: str, g: _Draw, start: Tensor) -> Tensor:
    if motion == "static":
        return _static(start)
    if motion == "drift":
        return _segment(start, start + _direction(g) * g.uniform(1.5, GENERIC_MAX_SHIFT), _time())
    if motion == "wander":
        amp = torch.tensor([g.uniform(0.8, 2.2), g.uniform(0.8, 2.2)])
        freq = torch.tensor([g.uniform(0.5, 1.5), g.uniform(0.5, 1.5)])
        phase = torch.tensor([g.uniform(0, 2 * math.pi), g.uniform(0, 2 * math.pi)])
        wave = torch.sin(2 * math.pi * freq[None] * _time()[:, None] + phase[None]) - torch.sin(phase)[None]
        return start[None] + amp[None] * wave  # (T, 2)
    raise KeyError(f"unknown generic motion {motion!r}; use one of {sorted(GENERIC_MOTIONS)}")


def tracks_for(kind: str, g: _Draw) -> tuple[Tensor, Tensor]:
    """Tracks of a relation (a RELATIONS key) or a generic motion (a GENERIC_MOTIONS key), drawn with g."""
    for _ in range(200):  # redraw until both tracks stay inside the frame (and apart, for generic)
        if kind in RELATION_TRACKS:
            t1, t2 = RELATION_TRACKS[kind](g)
        elif kind in GENERIC_MOTIONS:
            p1, p2 = _point(g), _point(g)
            if (p1 - p2).norm() < CONTACT + 3:
                continue
            t1, t2 = _generic_one(kind, g, p1), _generic_one(kind, g, p2)
            if (t1 - t2).norm(dim=1).min() < CONTACT + 1:
                continue
        else:
            raise KeyError(f"unknown clip kind {kind!r}: use a relation {sorted(RELATIONS)} "
                           f"or a generic motion {sorted(GENERIC_MOTIONS)}")
        placed = _place(t1, t2, g)
        if placed is not None:
            return placed
    raise RuntimeError(f"could not place the tracks of {kind!r} inside a {SIZE}px frame")


# --- drawing ---------------------------------------------------------------------------------------

def _grid() -> tuple[Tensor, Tensor]:
    ys, xs = torch.meshgrid(torch.arange(SIZE, dtype=torch.float32), torch.arange(SIZE, dtype=torch.float32),
                            indexing="ij")
    return xs, ys  # (H, W) each


def shape_mask(shape: str, centres: Tensor, radius: float) -> Tensor:
    """Filled shape at each centre: centres (T, 2) -> (T, H, W) bool."""
    xs, ys = _grid()
    dx = xs[None] - centres[:, 0, None, None]  # (T, H, W)
    dy = ys[None] - centres[:, 1, None, None]
    r = radius
    if shape == "circle":
        return dx.square() + dy.square() <= r * r
    if shape == "square":
        return (dx.abs() <= 0.8 * r) & (dy.abs() <= 0.8 * r)
    if shape == "triangle":  # pointing up: apex at -r, base at +0.75 r
        return (dy <= 0.75 * r) & (dx.abs() <= 0.95 * r * (dy + r) / (1.75 * r))
    if shape == "cross":
        arm = 0.38 * r
        return ((dx.abs() <= arm) & (dy.abs() <= r)) | ((dy.abs() <= arm) & (dx.abs() <= r))
    raise KeyError(f"unknown shape {shape!r}; toy shapes are {SHAPES}")


def draw(s1: Subject, s2: Subject, tracks: tuple[Tensor, Tensor], radii: tuple[float, float],
         background: tuple[float, float, float]) -> tuple[Tensor, Tensor]:
    """Video (3, T, H, W) in [-1, 1] and visible masks (2, T, H, W) for given tracks."""
    m1 = shape_mask(s1.shape, tracks[0], radii[0])  # (T, H, W)
    m2 = shape_mask(s2.shape, tracks[1], radii[1]) & ~m1  # subject 1 in front
    frames = torch.tensor(background, dtype=torch.float32)[:, None, None, None].expand(3, FRAMES, SIZE, SIZE).clone()
    for mask, subject in ((m1, s1), (m2, s2)):
        colour = torch.tensor(COLOURS[subject.colour])[:, None, None, None]  # (3, 1, 1, 1)
        frames = torch.where(mask[None], colour, frames)
    return frames * 2 - 1, torch.stack([m1, m2]).float()


def render_clip(kind: str, s1: Subject, s2: Subject, seed: int, staging: Staging = FREE) -> Clip:
    """One clip of a relation or a generic motion, deterministic from `seed` and `staging`."""
    g = _Draw(seed, staging)
    background = tuple(g.uniform(0.0, 0.22) for _ in range(3))
    radii = (g.uniform(*RADIUS_RANGE), g.uniform(*RADIUS_RANGE))
    t1, t2 = tracks_for(kind, g)
    video, masks = draw(s1, s2, (t1, t2), radii, background)
    return Clip(video=video, masks=masks, tracks=torch.stack([t1, t2]), radii=radii, background=background)
